"""ViT building blocks as thin ``nn.Module``s over ``fastvit.ops``.

Module and parameter names follow timm (``norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ...``) so state dicts load into either library unchanged. Every module that calls an op
has a ``backend`` attribute (None = the process default); ``VisionTransformer.set_backend`` sets
them all. Options no fused kernel covers (dropout inside attention or the MLP while training,
a non-LayerNorm norm layer, a non-GELU activation) run the reference path for that module only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit import dispatch, ops
from fastvit.ops.attention import SUPPORTED_HEAD_DIMS as ATTENTION_HEAD_DIMS


def to_2tuple(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (eps 1e-6 by default, as timm's ViT) computed by ``fastvit.ops.layer_norm``."""

    op_name = "layer_norm"

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class PatchEmbed(nn.Module):
    """Image to patch tokens: ``proj`` is a Conv2d with kernel = stride = patch size.

    ``forward`` returns the [B, N, D] patch tokens. ``VisionTransformer`` instead passes
    ``proj``'s parameters to ``fastvit.ops.patch_embed`` together with the position embedding and
    prefix tokens, so that all of it is one op.
    """

    op_name = "patch_embed"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size, "patch_size")
        self.img_size = to_2tuple(img_size, "img_size")
        self._check_divisible(self.img_size, "img_size")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(
            in_chans,
            embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.norm = nn.Identity()
        self.backend: str | None = None

    def _check_divisible(self, size: tuple[int, int], what: str) -> None:
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(
                f"{what} {size[0]}x{size[1]} is not divisible by the patch size "
                f"{self.patch_size[0]}x{self.patch_size[1]}"
            )

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = to_2tuple(img_size, "img_size")
        self._check_divisible(self.img_size, "img_size")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def check_input(self, x: object) -> torch.Tensor:
        """Validate an image batch: a float [B, in_chans, H, W] tensor of an acceptable size."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor image batch [B, C, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be a 4-D image batch [B, C, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(
                f"x must be a floating-point image batch, got {x.dtype}; convert integer images with "
                "x.float() / 255 and normalise them"
            )
        in_chans = self.proj.in_channels
        if x.shape[1] != in_chans:
            raise ValueError(f"x must have {in_chans} channels (in_chans), got shape {tuple(x.shape)}")
        size = (x.shape[2], x.shape[3])
        if self.strict_img_size:
            if size != self.img_size:
                raise ValueError(
                    f"x must be {self.img_size[0]}x{self.img_size[1]} pixels (img_size), got {size[0]}x{size[1]}; "
                    "build the model with that img_size, or with dynamic_img_size=True"
                )
        else:
            self._check_divisible(size, "image size")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return ops.patch_embed(x, self.proj.weight, self.proj.bias, backend=self.backend)


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a [1, T+H·W, D] position embedding to a new patch grid (fine-tuning at another resolution).

    The T prefix (class / register) embeddings are kept; the grid part is interpolated in fp32,
    as timm's ``resample_abs_pos_embed`` (bicubic, antialiased). ``old_size`` defaults to a square grid.
    """
    num_grid = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(
                f"cannot infer the patch grid of a position embedding with {num_grid} grid tokens "
                "(not a square); pass old_size"
            )
        old_size = (side, side)
    if old_size[0] * old_size[1] != num_grid:
        raise ValueError(f"old_size {old_size} does not match the {num_grid} grid tokens of posemb")
    if tuple(old_size) == tuple(new_size):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = posemb.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


class ResidualLinear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) whose ``forward(x, residual)`` adds ``residual`` inside the GEMM.

    ``forward(x)`` is ``F.linear``; ``forward(x, residual)`` is ``residual + linear(x)`` computed by
    ``fastvit.ops.linear_residual`` (on CUDA one cuBLASLt GEMM, the bias in its epilogue and the residual
    as its C operand). ``op_name``/``backend`` let ``VisionTransformer.set_backend`` choose that op's backend.
    """

    op_name = "linear_residual"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend: str | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return F.linear(x, self.weight, self.bias)
        return ops.linear_residual(x, self.weight, self.bias, residual, backend=self.backend)


def _dropout_active(module: nn.Module, training: bool) -> bool:
    """A dropout-like module (``nn.Dropout``, ``DropPath``, ``nn.Identity``) that changes its input in this mode."""
    if isinstance(module, nn.Identity):
        return False
    p = getattr(module, "p", getattr(module, "drop_prob", None))
    return p is None or (training and p > 0.0)  # an unknown module: assume it does something


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> ``ops.qkv_attention`` on the packed buffer -> proj.

    ``forward(x, residual)`` returns ``residual + attention(x)`` with the add inside the proj GEMM
    (``ops.linear_residual``) whenever ``proj_drop`` is inactive (eval, or p = 0); ``forward(x)`` returns
    ``attention(x)``. ``proj`` is a ``ResidualLinear`` (an ``nn.Linear``: timm's keys ``proj.weight/bias``).
    """

    op_name = "qkv_attention"

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = ResidualLinear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend: str | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, C] (normalised tokens); residual: [B, N, C] or None. Returns [B, N, C]."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = ops.qkv_attention(self.qkv(x), self.num_heads, self.scale, dropout_p=dropout_p, backend=self.backend)
        if residual is None:
            return self.proj_drop(self.proj(out))
        if _dropout_active(self.proj_drop, self.training) or not isinstance(self.proj, ResidualLinear):
            if dispatch.debug_enabled():
                dispatch.logger.debug(
                    "Attention: the residual add runs separately (proj_drop active while training, or proj is a %s)",
                    type(self.proj).__name__,
                )
            return residual + self.proj_drop(self.proj(out))
        return self.proj(out, residual)


class LNMLP(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2 (+ residual) as one ``ops.ln_mlp`` call: a block's ``norm2`` + ``mlp``.

    Submodules carry timm ``Mlp``'s names (``fc1``, ``act``, ``drop1``, ``fc2``, ``drop2``), so in a
    block's ``mlp`` slot its keys are timm's ``mlp.fc1.weight`` ... The LayerNorm is either:

    * owned (``norm=None``): a ``LayerNorm`` registered as ``norm`` (keys ``norm.weight``,
      ``norm.bias``) for standalone use, or
    * borrowed (``norm=block.norm2``): the norm stays registered by its owner, which keeps its keys
      (``norm2.weight``, ``norm2.bias``); this module reads its parameters at call time and never
      registers it. This is how a Block keeps timm's state dict:
      ``self.norm2 = LayerNorm(dim); self.mlp = LNMLP(dim, hidden, norm=self.norm2)``. (A module
      holding both cannot produce the sibling keys ``norm2.*`` and ``mlp.*`` by itself.)

    ``forward(x)`` returns ``x + mlp(norm(x))`` (``residual=True``, the default) or ``mlp(norm(x))``.
    Anything the fused op does not cover (a norm that is not an affine LayerNorm, a non-GELU
    activation, active dropout while training) runs the same modules unfused.

    Args:
        in_features: C, the token width.
        hidden_features: the hidden width (``mlp_ratio * C``).
        act_layer: activation class; ``nn.GELU`` (either ``approximate``) is fused.
        bias: Linear biases.
        drop: dropout after the activation and after fc2 (training only; unfused).
        eps: epsilon of the owned LayerNorm.
        norm: a LayerNorm to borrow instead of owning one.
        residual: default of ``forward``'s ``residual``.
    """

    op_name = "ln_mlp"

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        eps: float = 1e-6,
        norm: nn.Module | None = None,
        residual: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if norm is None:
            self.norm = LayerNorm(in_features, eps=eps, **dd)
        else:
            object.__setattr__(self, "_borrowed_norm", norm)  # plain attribute: not a submodule, no keys
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)
        self.residual = residual
        self.backend: str | None = None
        self._init_fusable()

    @classmethod
    def from_modules(cls, norm: nn.Module, mlp: nn.Module, residual: bool = True) -> LNMLP:
        """An LNMLP over an existing norm (borrowed) and timm-style ``Mlp`` (its fc1/act/fc2/dropouts, shared)."""
        hidden_norm = getattr(mlp, "norm", None)
        if hidden_norm is not None and not isinstance(hidden_norm, nn.Identity):
            raise ValueError("LNMLP.from_modules: an Mlp with a hidden-layer norm cannot be fused")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        object.__setattr__(module, "_borrowed_norm", norm)
        module.fc1, module.act, module.fc2 = mlp.fc1, mlp.act, mlp.fc2
        module.drop1 = getattr(mlp, "drop1", nn.Dropout(0.0))
        module.drop2 = getattr(mlp, "drop2", nn.Dropout(0.0))
        module.residual = residual
        module.backend = None
        module._init_fusable()
        return module

    def _init_fusable(self) -> None:
        # Chosen once, at construction (timm's habit); only dropout depends on train/eval.
        norm = self.layer_norm
        self.fusable = (
            isinstance(norm, nn.LayerNorm)
            and norm.weight is not None
            and norm.bias is not None
            and len(norm.normalized_shape) == 1
            and type(self.act) is nn.GELU
        )

    @property
    def layer_norm(self) -> nn.Module:
        """The LayerNorm applied first: the owned ``norm`` or the borrowed one."""
        borrowed = self.__dict__.get("_borrowed_norm")
        return borrowed if borrowed is not None else self.norm

    def forward(self, x: torch.Tensor, residual: bool | None = None) -> torch.Tensor:
        residual = self.residual if residual is None else residual
        norm = self.layer_norm
        dropout = self.training and (self.drop1.p > 0.0 or self.drop2.p > 0.0)
        if not self.fusable or dropout:
            out = self.drop2(self.fc2(self.drop1(self.act(self.fc1(norm(x))))))
            return x + out if residual else out
        return ops.ln_mlp(
            x,
            norm.weight,
            norm.bias,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            eps=norm.eps,
            approximate=self.act.approximate,
            residual=residual,
            backend=self.backend,
        )


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (CaiT / DeiT-III), parameter ``gamma``."""

    def __init__(self, dim: int, init_values: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: zero the residual branch of whole samples with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class PatchDropout(nn.Module):
    """Keep a random subset of patch tokens while training (prefix tokens always kept)."""

    def __init__(self, prob: float, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_drop_rate must be in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, num_patches = patches.shape[:2]
        num_keep = max(1, int(num_patches * (1.0 - self.prob)))
        keep = torch.argsort(torch.randn(batch, num_patches, device=x.device), dim=-1)[:, :num_keep]
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, patches], dim=1)


@dataclasses.dataclass(frozen=True)
class HalfFusion:
    """How one half of a ``Block`` runs: see ``Block.fusion_status``.

    Attributes:
        fused: the residual add is inside the half's last op and every op of the half runs a fused kernel.
        backends: {op name: the backend that runs it} ('unusable' for an explicit backend that cannot run).
        why_not: the reasons it is not fused (empty when ``fused``).
    """

    fused: bool
    backends: dict[str, str]
    why_not: tuple[str, ...]

    def __str__(self) -> str:
        ops_text = ", ".join(f"{op}={backend}" for op, backend in self.backends.items())
        if self.fused:
            return f"fused ({ops_text})"
        return f"unfused ({ops_text}): " + "; ".join(self.why_not)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Attention half: with ``ls1`` an Identity and no active drop-path or proj dropout, the proj Linear and
    the residual add are one ``ops.linear_residual`` call (``x = linear_residual(attn_out, proj.weight,
    proj.bias, x)``). The MLP half is an ``LNMLP`` borrowing ``norm2``: one ``ops.ln_mlp`` call (LayerNorm,
    fc1, GELU, fc2 and the residual add) whenever its pieces are the standard ones (``norm2`` a LayerNorm,
    ``mlp.act`` a GELU, no MLP dropout active) and ``ls2`` is an Identity with no active drop-path.
    Otherwise LayerScale and drop-path apply to the half's un-added output, as timm. Drop-path is
    inactive in eval mode, so a model trained with it still runs fused for inference.
    ``fusion_status`` says which halves run fused and why not; an unfused half also logs at DEBUG on
    the ``"fastvit"`` logger.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = LayerNorm,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        # norm2 stays registered here (timm's keys norm2.*); the MLP borrows it and runs both as one op.
        self.mlp = LNMLP(
            dim, int(dim * mlp_ratio), act_layer=act_layer, bias=proj_bias, drop=proj_drop, norm=self.norm2, **dd
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.ls1, nn.Identity) and not _dropout_active(self.drop_path1, self.training):
            x = self.attn(self.norm1(x), residual=x)  # proj + residual: one op (unless proj_drop is active)
        else:
            if dispatch.debug_enabled():
                dispatch.logger.debug("Block: attention half unfused: %s", "; ".join(self._attn_residual_blockers()))
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if isinstance(self.ls2, nn.Identity) and not _dropout_active(self.drop_path2, self.training):
            return self.mlp(x, residual=True)
        if dispatch.debug_enabled():
            dispatch.logger.debug("Block: MLP half unfused: %s", "; ".join(self._mlp_residual_blockers()))
        return x + self.drop_path2(self.ls2(self.mlp(x, residual=False)))

    def _attn_residual_blockers(self) -> list[str]:
        """Why the attention half's residual add cannot be inside the proj GEMM (in the current mode)."""
        reasons = []
        if not isinstance(self.ls1, nn.Identity):
            reasons.append(f"ls1 is a {type(self.ls1).__name__} (the residual add runs separately)")
        if _dropout_active(self.drop_path1, self.training):
            reasons.append(f"drop_path1 is active while training ({self.drop_path1})")
        proj_drop = getattr(self.attn, "proj_drop", nn.Identity())
        if _dropout_active(proj_drop, self.training):
            reasons.append(f"attn.proj_drop is active while training (p={getattr(proj_drop, 'p', '?')})")
        if not isinstance(getattr(self.attn, "proj", None), ResidualLinear):
            reasons.append(f"attn.proj is a {type(getattr(self.attn, 'proj', None)).__name__}, not a ResidualLinear")
        return reasons

    def _mlp_residual_blockers(self) -> list[str]:
        """Why the MLP half is not one ``ln_mlp`` call with the residual inside (in the current mode)."""
        reasons = []
        if not isinstance(self.ls2, nn.Identity):
            reasons.append(f"ls2 is a {type(self.ls2).__name__} (the residual add runs separately)")
        if _dropout_active(self.drop_path2, self.training):
            reasons.append(f"drop_path2 is active while training ({self.drop_path2})")
        if not getattr(self.mlp, "fusable", False):
            norm, act = getattr(self.mlp, "layer_norm", self.norm2), getattr(self.mlp, "act", None)
            reasons.append(
                f"the MLP is not LayerNorm -> Linear -> GELU -> Linear (norm2 {type(norm).__name__}, "
                f"act {type(act).__name__}): its modules run one by one"
            )
        drops = [getattr(self.mlp, name, nn.Identity()) for name in ("drop1", "drop2")]
        if any(_dropout_active(d, self.training) for d in drops):
            reasons.append(f"MLP dropout is active while training (p={getattr(drops[0], 'p', '?')})")
        return reasons

    def fusion_status(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, HalfFusion]:
        """Which halves of this block run fused for inputs on ``device``, in the current train/eval mode, and why not.

        Args:
            device: where the inputs will be.
            dtype: the activations' dtype (default: the parameters'); the kernels take fp16/bf16/fp32
                (the C++ CPU path also fp64).

        Returns:
            {'attn': HalfFusion, 'mlp': HalfFusion}.
        """
        device = torch.device(device)
        dtype = self.attn.qkv.weight.dtype if dtype is None else dtype
        dtype_limit = None if dtype in KERNEL_DTYPES else f"the kernels do not take {dtype}"
        head_limit = None
        if self.attn.head_dim not in ATTENTION_HEAD_DIMS:
            head_limit = f"head_dim {self.attn.head_dim} is not one the kernels cover {ATTENTION_HEAD_DIMS}"
        if _dropout_active(self.attn.attn_drop, self.training):
            head_limit = f"attention dropout is active while training (p={self.attn.attn_drop.p})"
        attn_ops = {
            "qkv_attention": (self.attn.backend, head_limit, dtype_limit),
            "linear_residual": (getattr(self.attn.proj, "backend", None), None, dtype_limit),
        }
        return {
            "attn": _half_fusion(attn_ops, self._attn_residual_blockers(), device),
            "mlp": _half_fusion(
                {"ln_mlp": (self.mlp.backend, None, dtype_limit)}, self._mlp_residual_blockers(), device
            ),
        }


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _half_fusion(
    op_backends: dict[str, tuple[str | None, str | None, str | None]], why_not: list[str], device: torch.device
) -> HalfFusion:
    """``op_backends``: {op: (backend asked for, a limit of every fused kernel, a dtype limit)}; the dtype
    limit applies to Triton kernels and to CUDA tensors (the extension's C++ CPU path takes every dtype)."""
    backends, why_not = {}, list(why_not)
    for op, (backend, limit, dtype_limit) in op_backends.items():
        resolved, reason = dispatch.fused_status(op, backend, device)
        if reason is None and dtype_limit is not None and (resolved == "triton" or device.type == "cuda"):
            limit = limit or dtype_limit
        if reason is None and limit is not None:
            resolved, reason = "torch", f"{limit}: the reference runs ('auto'; an explicit fused backend raises)"
        backends[op] = resolved
        if reason is not None:
            why_not.append(f"{op}: {reason}")
    return HalfFusion(fused=not why_not, backends=backends, why_not=tuple(why_not))
