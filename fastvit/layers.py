"""ViT building blocks as thin ``nn.Module``s over ``fastvit.ops``.

Module and parameter names follow timm (``norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ...``) so state dicts load into either library unchanged. Every module that calls an op
has a ``backend`` attribute (None = the process default); ``VisionTransformer.set_backend`` sets
them all. Options no fused kernel covers (dropout inside attention or the MLP while training,
a non-LayerNorm norm layer, a non-GELU activation) run the reference path for that module only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit import ops


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


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> ``ops.qkv_attention`` on the packed buffer -> proj."""

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
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = ops.qkv_attention(self.qkv(x), self.num_heads, self.scale, dropout_p=dropout_p, backend=self.backend)
        return self.proj_drop(self.proj(x))


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


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    The MLP half is an ``LNMLP`` borrowing ``norm2``: one ``ops.ln_mlp`` call (LayerNorm, fc1, GELU, fc2
    and the residual add) whenever its pieces are the standard ones (``norm2`` a LayerNorm, ``mlp.act``
    a GELU, no MLP dropout active). LayerScale and drop-path, when present, apply to its un-added output.
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
        self.mlp_residual_in_op = isinstance(self.ls2, nn.Identity) and isinstance(self.drop_path2, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.mlp_residual_in_op:
            return self.mlp(x, residual=True)
        return x + self.drop_path2(self.ls2(self.mlp(x, residual=False)))
