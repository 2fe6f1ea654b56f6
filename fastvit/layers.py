"""ViT building blocks as thin ``nn.Module``s over ``fastvit.ops``.

Module and parameter names follow timm (``norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ...``) so state dicts load into either library unchanged. Every module that calls an op
has ``op_name`` and ``backend`` attributes (None = the process default); ``VisionTransformer.set_backend``
sets them all.

A fused path reads submodules' weights instead of calling them (``ops.ln_mlp`` reads ``norm2``, ``mlp.fc1``
and ``mlp.fc2``; the attention half adds the residual inside the proj GEMM; ``ops.patch_embed`` reads
``proj``). That is only right while those submodules are the plain modules it expects: a peft LoRA wrapper,
a forward hook, a replaced ``forward``, a swapped norm or activation, or active dropout/drop-path must be
*called*. So the rule is read off the modules registered now, on every call (a handful of type and dict
checks; the structure can change after construction, which a flag decided once would miss): one blocker list
per half (:func:`attention_half_blockers`, :func:`mlp_half_blockers`), asked by the forward and by
``fastvit.fusion``'s report. Anything a fused path cannot read runs the registered modules one by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

from fastvit import dispatch, ops
from fastvit.ops.attention import QKNorm, apply_rope
from fastvit.ops.linear_residual import linear_call
from fastvit.ops.ln_linear import GemmCall
from fastvit.ops.patch_embed import prefix_and_position
from fastvit.packing import AttnMask, PackedSequences, check_attn_mask, is_key_padding_mask, sdpa_mask
from fastvit.validation import autocast_enabled


def to_2tuple(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``value`` as an (H, W) pair of positive ints (an image or patch size)."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


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


class RmsNorm(nn.Module):
    """timm's ``RmsNorm``: ``x * rsqrt(mean(x**2) + eps) * weight`` over the last dimension (key ``weight``).

    Used by AIMv2 and the ``_xp`` ViTs. Runs ``ops.rms_norm`` (the extension's kernel where ``auto`` finds it, else
    ``F.rms_norm``; the spec is ``fastvit.reference.rms_norm``); without a weight, ``F.rms_norm``.
    """

    op_name = "rms_norm"

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.normalized_shape = (channels,)
        self.eps = eps
        self.elementwise_affine = affine
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype)) if affine else None
        self.backend: str | None = None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, affine={self.elementwise_affine}"


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (timm's ``act_layer='quick_gelu'``)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    """Image to patch tokens: ``proj`` is a Conv2d with kernel = stride = patch size (timm's keys ``proj.*``).

    ``forward(x)`` returns the [B, N, D] patch tokens, as timm's; ``forward(x, pos_embed, prefix_tokens)``
    also prepends the prefix (class / register) tokens and adds the position embedding, all as one
    ``ops.patch_embed`` call while :func:`patch_embed_blockers` finds nothing: ``proj`` a plain Conv2d and ``norm``
    an Identity or a plain LayerNorm / RmsNorm with a weight (AIMv2's ``embed_norm_layer``: the op's
    ``norm_weight``/``norm_bias``, applied to the patch tokens before the position embedding). Else ``proj`` and
    ``norm`` are called and the rest follows.

    An ``img_size`` that is not a multiple of the patch (SigLIP so400m/14 at 384 px: 27 patches of 14 and 6 pixels
    over) is accepted as timm's: the Conv2d's stride drops the trailing pixels, so the image is cropped to the patch
    grid before ``ops.patch_embed``. Images of any other size (``dynamic_img_size``) must be multiples of the patch.
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
        norm_layer: Callable[..., nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size, "patch_size")
        self.img_size = to_2tuple(img_size, "img_size")
        self._check_holds_a_patch(self.img_size, "img_size")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(
            in_chans,
            embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.norm = norm_layer(embed_dim, device=device, dtype=dtype) if norm_layer is not None else nn.Identity()
        self.backend: str | None = None

    def _check_holds_a_patch(self, size: tuple[int, int], what: str) -> None:
        if size[0] < self.patch_size[0] or size[1] < self.patch_size[1]:
            raise ValueError(
                f"{what} {size[0]}x{size[1]} holds no {self.patch_size[0]}x{self.patch_size[1]} patch; it must "
                "be at least one patch in each dimension"
            )

    def _check_divisible(self, size: tuple[int, int], what: str) -> None:
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(
                f"{what} {size[0]}x{size[1]} is not divisible by the patch size "
                f"{self.patch_size[0]}x{self.patch_size[1]}"
            )

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the expected image size; validated before anything changes."""
        img_size = to_2tuple(img_size, "img_size")
        self._check_holds_a_patch(img_size, "img_size")
        self.img_size = img_size
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
        # An adapter wrapping proj (a peft LoRA Conv2d) has no in_channels of its own: the width built then holds.
        in_chans = getattr(self.proj, "in_channels", self.in_chans)
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
            self._check_holds_a_patch(size, "image size")
            self._check_divisible(size, "image size")
        return x

    def forward(
        self, x: torch.Tensor, pos_embed: torch.Tensor | None = None, prefix_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, T+N, D]; pos_embed: [1, T+N, D] or [1, N, D] or None; prefix_tokens: [1, T, D]."""
        self.check_input(x)
        grid_h, grid_w = self.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = x[..., : grid_h * self.patch_size[0], : grid_w * self.patch_size[1]]  # as the conv's stride: no-op if exact
        proj, norm = self.proj, self.norm
        if not patch_embed_blockers(self):
            kind = norm_kind(norm)
            normed = {}
            if kind is not None:  # RmsNorm has no bias
                normed = dict(
                    norm_weight=norm.weight, norm_bias=getattr(norm, "bias", None), norm_eps=norm.eps, norm=kind
                )
            return ops.patch_embed(x, proj.weight, proj.bias, pos_embed, prefix_tokens, backend=self.backend, **normed)
        tokens = norm(proj(x).flatten(2).transpose(1, 2))
        return prefix_and_position(tokens, pos_embed, prefix_tokens)


def patch_embed_blockers(embed: PatchEmbed) -> list[str]:
    """Why ``embed`` does not run as one ``ops.patch_embed`` call (empty: it does): the rule ``PatchEmbed.forward``
    and the fusion report both ask."""
    why = []
    if not plain(embed.proj, nn.Conv2d):
        why.append(f"proj is a {type(embed.proj).__name__} (a wrapper or adapter), not a plain nn.Conv2d")
    if not plain(embed.norm, nn.Identity):
        if norm_kind(embed.norm) is None:
            why.append(f"norm is a {type(embed.norm).__name__}, not a plain LayerNorm / RmsNorm with a weight")
        elif mixed := norm_dtype_blocker("norm", embed.norm, embed.proj.weight):
            why.append(mixed)
    if _global_hooks():
        why.append("global module hooks are registered")
    return why


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
    """``nn.Linear`` (same parameters and keys) that also carries the backend of ``ops.linear_residual``.

    ``forward(x)`` is ``F.linear``. A ``Block`` whose attention half is fusable adds its residual inside this
    Linear's GEMM through ``Attention.forward_residual`` (``ops.linear_residual`` with this layer's weight,
    bias and ``backend``).
    """

    op_name = "linear_residual"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend: str | None = None


class NormLinear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) that also carries the backend of ``ops.ln_linear``.

    ``forward(x)`` is ``F.linear``. A ``Block`` hands its pre-norm to the attention (``Attention.project``), which
    runs ``norm`` + this Linear as one ``ops.ln_linear`` call (the LayerNorm applied in the GEMM's prologue) where
    dispatch picks a fused GEMM for the call (``fastvit/gemm_choices.json``: measured wins only), else the norm
    module and then this Linear, as without it.
    """

    op_name = "ln_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend: str | None = None

    def gemm_call(self, device: torch.device, dtype: torch.dtype, norm: bool) -> GemmCall:
        """The dispatch key of this Linear as ``ops.ln_linear`` (with a norm prologue if ``norm``) in ``dtype``."""
        return GemmCall(device, dtype, self.in_features, self.out_features, norm)


def layer_norm_prologue_fits(norm: nn.Module, linear: nn.Module) -> bool:
    """True when ``linear(norm(x))`` is ``ops.ln_linear``'s form: a plain affine LayerNorm (weight and bias) and a
    plain ``NormLinear``, in one dtype outside autocast (``norm_dtype_blocker``)."""
    if not (norm_kind(norm) == "layer" and norm.bias is not None and plain(linear, NormLinear)):
        return False
    return norm_dtype_blocker("norm", norm, linear.weight) is None


def _set_heads(module: nn.Module, dim: int, num_heads: int) -> None:
    """An attention module's head bookkeeping: ``num_heads``, ``head_dim`` and the softmax ``scale`` (D**-0.5)."""
    if dim % num_heads != 0:
        raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
    module.num_heads = num_heads
    module.head_dim = dim // num_heads
    module.scale = module.head_dim**-0.5


def split_qkv_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, N, 3·C] in timm's layout -> q, k, v [B, H, N, D] views (no copy)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def _add_qk_norms(module: nn.Module, qk_norm: bool, norm_layer: Callable[..., nn.Module], dd: dict) -> None:
    """timm's ``q_norm`` / ``k_norm``: a ``norm_layer`` over each head's D channels, or Identity without qk-norm."""
    module.q_norm = norm_layer(module.head_dim, **dd) if qk_norm else nn.Identity()
    module.k_norm = norm_layer(module.head_dim, **dd) if qk_norm else nn.Identity()


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> ``ops.qkv_attention`` on the packed buffer -> proj.

    ``forward(x)`` returns ``proj_drop(proj(attention(x)))`` as timm's. ``forward_residual(x, residual)``
    returns ``residual + proj(attention(x))`` with the add inside the proj GEMM (``ops.linear_residual``); its
    caller (``Block``) checks first that nothing it skips acts (``attention_half_blockers``).

    With ``qk_norm=True`` (timm's keys ``q_norm.*``, ``k_norm.*``: a ``norm_layer`` over each head's D channels)
    the norms are ``ops.qkv_attention``'s prologue (applied inside the kernel) while ``prologue_blockers`` finds
    nothing (plain affine LayerNorm / RmsNorm modules); otherwise q, k, v are split, the norm modules called and
    ``ops.attention`` runs on the [B, H, N, D] views (the spec: ``fastvit.reference.qk_norm_attention``).
    """

    op_name = "qkv_attention"

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _set_heads(self, dim, num_heads)
        dd = {"device": device, "dtype": dtype}
        self.qkv = NormLinear(dim, dim * 3, bias=qkv_bias, **dd)
        _add_qk_norms(self, qk_norm, norm_layer or LayerNorm, dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = ResidualLinear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend: str | None = None

    def packed(self) -> bool:
        """True when ``ops.qkv_attention`` reads the packed qkv buffer directly, its prologue applying the qk-norm
        (if any): ``prologue_blockers`` finds nothing."""
        return next(prologue_blockers(self), None) is None

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, N, C] -> q, k, v: [B, H, N, D] each, as attention uses them (after qk-norm)."""
        return self._heads(self.qkv(x))

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = split_qkv_heads(qkv, self.num_heads)
        return self.q_norm(q), self.k_norm(k), v

    def project(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x: [B, N, C] -> qkv [B, N, 3C] = ``qkv(norm(x))`` (``norm`` None: x is already normalised). One
        ``ops.ln_linear`` call where ``layer_norm_prologue_fits`` and dispatch runs it on a fused GEMM."""
        if norm is None:
            return self.qkv(x)
        qkv = self.qkv
        if layer_norm_prologue_fits(norm, qkv):
            call = qkv.gemm_call(*linear_call(x), norm=True)
            if dispatch.selected("ln_linear", qkv.backend, call) != "torch":
                return ops.ln_linear(x, norm.weight, norm.bias, qkv.weight, qkv.bias, norm.eps, backend=qkv.backend)
        return qkv(norm(x))

    def attend(self, x: torch.Tensor, attn_mask: AttnMask = None, norm: nn.Module | None = None) -> torch.Tensor:
        """x: [B, N, C] (tokens, normalised unless ``norm`` is given: the block's pre-norm, see ``project``) -> the
        heads' outputs [B, N, C], before proj. ``attn_mask``: see ``fastvit.packing``."""
        qkv = self.project(x, norm)
        return attend(self, x, attn_mask, lambda: qkv, lambda: self._heads(qkv))

    def forward(self, x: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        return self.proj_drop(self.proj(self.attend(x, attn_mask)))

    def forward_residual(
        self, x: torch.Tensor, residual: torch.Tensor, attn_mask: AttnMask = None, norm: nn.Module | None = None,
        layer_scale: nn.Module | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``residual + layer_scale(proj(attention(norm(x))))``, the add inside the proj GEMM (a ``LayerScale``
        folded into its weight and bias; an Identity or None: none); proj_drop is not applied."""
        proj = self.proj
        out = self.attend(x, attn_mask, norm)
        gamma = layer_scale.gamma if isinstance(layer_scale, LayerScale) else None
        return ops.linear_residual(out, proj.weight, proj.bias, residual, backend=proj.backend, layer_scale=gamma)


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1 -> act -> drop1 -> norm -> fc2 -> drop2 (same names and keys).

    In a ``Block`` the norm before it (``norm2``), this MLP, LayerScale (``ls2``) and the residual add run as one
    ``ops.ln_mlp`` call when ``mlp_half_blockers`` finds nothing that must be called (activations ``nn.GELU``
    either form, ``QuickGELU``); ``backend`` is that op's backend. ``norm_layer`` is the hidden-layer norm (timm's
    ``scale_mlp_norm``), passed to ``ln_mlp`` as its hidden norm when it is of the block norm's kind.
    """

    op_name = "ln_mlp"

    def __init__(
        self, in_features: int, hidden_features: int, out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool = True, drop: float = 0.0, device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        _add_mlp_tail(self, hidden_features, out_features or in_features, act_layer, norm_layer, bias, drop, dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def _add_mlp_tail(mlp: nn.Module, width: int, out_features: int, act_layer, norm_layer, bias: bool, drop: float, dd):
    """The modules after fc1 that the MLP classes share, in timm's order: act, drop1, norm (over ``width``, the
    features fc2 reads), fc2, drop2; and the ``backend`` of ``ops.ln_mlp``."""
    mlp.act = act_layer()
    mlp.drop1 = nn.Dropout(drop)
    mlp.norm = norm_layer(width, **dd) if norm_layer is not None else nn.Identity()
    mlp.fc2 = nn.Linear(width, out_features, bias=bias, **dd)
    mlp.drop2 = nn.Dropout(drop)
    mlp.backend = None


class GluMlp(nn.Module):
    """timm's ``GluMlp``: one fc1 whose output halves are a value and a gate, ``act(gate) * value`` -> fc2.

    ``hidden_features`` is fc1's width (twice the gated width fc2 reads). ``gate_last=False`` gates with the first
    half: ``SwiGLUPacked`` (SiLU, DINOv2 giant, EVA without sub-LN). Keys ``fc1.*``, ``norm.*``, ``fc2.*``. In a
    ``Block``, SiLU gating with the first half runs as one ``ops.ln_mlp(act='swiglu')`` call (as ``Mlp``; ``backend``
    is that op's backend); other gates run as modules. The spec is ``fastvit.reference.glu_mlp``.
    """

    op_name = "ln_mlp"

    def __init__(
        self, in_features: int, hidden_features: int, out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.Sigmoid, norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool = True, drop: float = 0.0, gate_last: bool = True, device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        if hidden_features % 2:
            raise ValueError(f"a gated MLP's hidden_features must be even (two halves), got {hidden_features}")
        dd = {"device": device, "dtype": dtype}
        self.gate_last = gate_last
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        _add_mlp_tail(self, hidden_features // 2, out_features or in_features, act_layer, norm_layer, bias, drop, dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.fc1(x).chunk(2, dim=-1)
        x = first * self.act(second) if self.gate_last else self.act(first) * second
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


SwiGLUPacked = partial(GluMlp, act_layer=nn.SiLU, gate_last=False)


class SwiGLU(nn.Module):
    """timm's ``SwiGLU`` with split fc1: ``fc2(norm(silu(fc1_g(x)) * fc1_x(x)))`` (EVA02, AIMv2, DINOv3 S+/H+).

    Keys ``fc1_g.*``, ``fc1_x.*``, ``norm.*`` (the sub-LN, timm's ``scale_mlp``), ``fc2.*``. In a ``Block`` it runs
    as one ``ops.ln_mlp(act='swiglu')`` call on ``cat([fc1_g, fc1_x])`` (one [2·Hid, C] copy of the weights per call:
    the op keeps one packed layout, so every backend has one GEMM for fc1). The spec is
    ``fastvit.reference.swiglu_mlp``.
    """

    op_name = "ln_mlp"

    def __init__(
        self, in_features: int, hidden_features: int, out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.SiLU, norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool = True, drop: float = 0.0, align_to: int = 0, device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if align_to:
            hidden_features += -hidden_features % align_to
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        _add_mlp_tail(self, hidden_features, out_features or in_features, act_layer, norm_layer, bias, drop, dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1_g(x)) * self.fc1_x(x)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


def norm_kind(norm: nn.Module) -> str | None:
    """``ops.ln_mlp``'s ``norm`` for a plain norm module with a weight ('layer' | 'rms'), else None."""
    if plain(norm, LayerNorm, nn.LayerNorm) and norm.weight is not None and len(norm.normalized_shape) == 1:
        return "layer"
    if plain(norm, RmsNorm) and norm.weight is not None:
        return "rms"
    return None


def norm_dtype_blocker(name: str, norm: nn.Module, weight: torch.Tensor) -> str | None:
    """Why the norm ``name`` cannot run inside the fused op of the GEMM with ``weight`` (None: it can): parameters in
    another dtype than the GEMM's, outside autocast. torch's LayerNorm takes them (fp32 norms in a bf16 model, as
    mixed-precision recipes keep them); the fused ops take one dtype there, so such a norm is called as a module."""
    dtypes = {p.dtype for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)) if p is not None}
    if not dtypes - {weight.dtype} or autocast_enabled(weight.device):
        return None
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    return (
        f"{name}'s parameters are {names}, the GEMM's weight {str(weight.dtype).removeprefix('torch.')}: outside "
        "autocast the fused op takes one dtype, so the norm is called"
    )


def mlp_act(mlp: nn.Module) -> str | None:
    """``ops.ln_mlp``'s ``act`` for a plain activation of ``mlp`` (the gated MLPs: SiLU gating with the first half),
    else None."""
    if isinstance(mlp, (GluMlp, SwiGLU)):
        return "swiglu" if plain(mlp.act, nn.SiLU) and not getattr(mlp, "gate_last", False) else None
    return activation_name(mlp.act)


def activation_name(act: nn.Module) -> str | None:
    """The fused ops' name of a plain single-input activation module ('gelu' | 'gelu_tanh' | 'quick_gelu'), else
    None."""
    if plain(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return "quick_gelu" if plain(act, QuickGELU) else None


def _fc1(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fc1's weight [P, C] and bias [P] or None; the split SwiGLU's two Linears as one packed fc1, gate rows first."""
    if isinstance(mlp, SwiGLU):
        g, v = mlp.fc1_g, mlp.fc1_x
        return torch.cat([g.weight, v.weight]), None if g.bias is None else torch.cat([g.bias, v.bias])
    return mlp.fc1.weight, mlp.fc1.bias


def fused_mlp_call(norm: nn.Module, mlp: nn.Module, device: torch.device, dtype: torch.dtype):
    """The ``ops.ln_mlp`` call signature (``MlpCall``) of ``_fused_ln_mlp(norm, mlp, ...)`` on ``device``/``dtype``.

    Reads no more than it must: a replaced fc2 (an adapter without ``in_features``) gives shape 0 (the blockers
    already say that half runs unfused)."""
    from fastvit.ops.ln_mlp import MlpCall

    width, hidden = getattr(mlp.fc2, "out_features", 0), getattr(mlp.fc2, "in_features", 0)
    hidden_norm = not isinstance(getattr(mlp, "norm", None), (nn.Identity, type(None)))
    return MlpCall(device, dtype, width, hidden, True, mlp_act(mlp) or "gelu", norm_kind(norm) or "layer", hidden_norm)


def _fused_ln_mlp(
    norm: nn.Module,
    mlp: nn.Module,
    x: torch.Tensor,
    residual: bool,
    backend: str | None,
    layer_scale: nn.Module | torch.Tensor | None = None,
    hidden_norm: nn.Module | None = None,
):
    """``[x +] layer_scale(mlp(norm(x)))`` as one ``ops.ln_mlp`` call (the caller checked the blockers).

    ``layer_scale``: a ``LayerScale``, a gamma [C], an Identity or None; ``hidden_norm``: the norm over the hidden
    layer (default ``mlp.norm``; an Identity for none).
    """
    hidden_norm = mlp.norm if hidden_norm is None else hidden_norm
    if isinstance(layer_scale, LayerScale):
        layer_scale = layer_scale.gamma
    elif isinstance(layer_scale, nn.Module):  # nn.Identity
        layer_scale = None
    hidden_kwargs = {}
    if not isinstance(hidden_norm, nn.Identity):
        hidden_kwargs = dict(
            hidden_norm_weight=hidden_norm.weight, hidden_norm_bias=getattr(hidden_norm, "bias", None),
            hidden_norm_eps=hidden_norm.eps,
        )  # fmt: skip
    fc1_weight, fc1_bias = _fc1(mlp)
    return ops.ln_mlp(
        x, norm.weight, getattr(norm, "bias", None), fc1_weight, fc1_bias, mlp.fc2.weight, mlp.fc2.bias,
        eps=norm.eps, residual=residual, backend=backend, act=mlp_act(mlp), norm=norm_kind(norm),
        layer_scale=layer_scale, **hidden_kwargs,
    )  # fmt: skip


class LNMLP(Mlp):
    """LayerNorm -> fc1 -> GELU -> fc2 (+ residual) as one ``ops.ln_mlp`` call, for use outside a ``Block``.

    An ``Mlp`` whose ``norm`` slot holds the LayerNorm applied *before* fc1 (keys ``norm.weight``, ``norm.bias``,
    ``fc1.*``, ``fc2.*``). ``forward(x)`` returns ``x + mlp(norm(x))`` (``residual=True``, the default) or
    ``mlp(norm(x))``. Anything the fused op does not cover (a norm that is not a plain affine LayerNorm, a non-GELU
    activation, an adapter or hook on a Linear, active dropout while training) runs the same modules unfused
    (``mlp_blockers``).

    Args:
        in_features: C, the token width.
        hidden_features: the hidden width (``mlp_ratio * C``).
        eps: epsilon of the LayerNorm.
        residual: default of ``forward``'s ``residual``.
        mlp_kwargs: ``Mlp``'s ``act_layer`` (``nn.GELU``, either ``approximate``, is fused), ``bias``, ``drop``
            (dropout after the activation and after fc2: training only, unfused), ``device``, ``dtype``.
    """

    def __init__(
        self, in_features: int, hidden_features: int, eps: float = 1e-6, residual: bool = True, **mlp_kwargs
    ) -> None:
        super().__init__(in_features, hidden_features, **mlp_kwargs)
        dd = {key: mlp_kwargs.get(key) for key in ("device", "dtype")}
        self.norm = LayerNorm(in_features, eps=eps, **dd)
        self.residual = residual

    def forward(self, x: torch.Tensor, residual: bool | None = None) -> torch.Tensor:
        residual = self.residual if residual is None else residual
        if next(mlp_blockers(self.norm, self, _NO_HIDDEN_NORM, self.training), None) is None:
            return _fused_ln_mlp(self.norm, self, x, residual, self.backend, hidden_norm=_NO_HIDDEN_NORM)
        out = self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.norm(x))))))
        return x + out if residual else out


_NO_HIDDEN_NORM = nn.Identity()  # LNMLP has no hidden-layer norm


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
    """Stochastic depth: zero the residual branch of whole samples with probability ``drop_prob``. Under
    ``attn_mask=PackedSequences`` (images packed into one [1, T, C] sequence) a sample is a packed sequence: each
    image's tokens are kept or dropped together, as when the images run batched."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """x: [B, N, C] (or [B, ...]) -> the same shape; ``attn_mask``: the block's (see ``fastvit.packing``)."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        if isinstance(attn_mask, PackedSequences):
            keep = x.new_empty(max(attn_mask.num_sequences, 1)).bernoulli_(keep_prob)
            sequence = attn_mask.sequence_ids(x.shape[1]).clamp_(max=keep.numel() - 1)
            mask = keep[sequence].view(1, -1, *(1,) * (x.dim() - 2))
        else:
            mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def drop_path(module: nn.Module, x: torch.Tensor, attn_mask: AttnMask) -> torch.Tensor:
    """A block's ``drop_path*`` module (``DropPath`` or ``nn.Identity``) on its residual branch x, per packed image
    under a packing."""
    return module(x, attn_mask) if attn_mask is not None and isinstance(module, DropPath) else module(x)


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


class AttentionPoolLatent(nn.Module):
    """timm's ``AttentionPoolLatent`` (``global_pool='map'``, SigLIP): one learned latent query attends over the
    tokens, then proj and a residual ``norm`` -> ``mlp``; returns the pooled [B, C].

    Keys ``latent`` [1, 1, C], ``q.*``, ``kv.*`` (k and v packed as timm's ``reshape(B, N, 2, H, D)``),
    ``q_norm``/``k_norm`` (qk-norm), ``proj.*``, ``norm.*``, ``mlp.fc1.*``, ``mlp.fc2.*``. The attention is
    ``ops.attention`` with one query; ``x + mlp(norm(x))`` is one ``ops.ln_mlp`` call while ``mlp_blockers`` finds
    nothing that must be called (a LayerNorm and a GELU Mlp). The spec is ``fastvit.reference.attention_pool``.
    """

    op_name = "qkv_attention"  # the attention's backend follows the model's attention backend

    def __init__(
        self, in_features: int, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True,
        qk_norm: bool = False, norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0, device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        _set_heads(self, in_features, num_heads)
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or LayerNorm
        self.latent_len = 1
        self.latent = nn.Parameter(torch.zeros(1, 1, in_features, **dd))
        self.q = nn.Linear(in_features, in_features, bias=qkv_bias, **dd)
        self.kv = nn.Linear(in_features, in_features * 2, bias=qkv_bias, **dd)
        _add_qk_norms(self, qk_norm, norm_layer, dd)
        self.proj = nn.Linear(in_features, in_features, **dd)
        self.proj_drop = nn.Dropout(drop)
        self.norm = norm_layer(in_features, **dd)
        self.mlp = Mlp(in_features, int(in_features * mlp_ratio), act_layer=act_layer, **dd)
        self.backend: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.latent, std=self.latent.shape[-1] ** -0.5)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, N, C] -> q [B, H, 1, D] (from the latent), k, v [B, H, N, D], as attention uses them (qk-normed)."""
        q, k, v = self._raw_heads(x)
        return self.q_norm(q), self.k_norm(k), v

    def _raw_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, 1, D]: the latent's projection once, broadcast over the batch (stride 0); k, v: views of kv(x)."""
        q = self.q(self.latent).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(x).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return q.expand(x.shape[0], -1, -1, -1), k, v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, C] -> [B, C]. ``attn_mask``: a [B, N] bool key-padding mask (True = the token is pooled; timm
        NaFlexViT's ``patch_valid``); an entry without a pooled token gets attention output 0 (the spec; SDPA in timm
        gives NaN there). Other SDPA mask forms run on SDPA."""
        check_attn_mask(attn_mask, x)
        q, k, v = self._raw_heads(x)
        if attn_mask is None or is_key_padding_mask(attn_mask):
            norms = {}
            if next(prologue_blockers(self, "attn_pool."), None) is None:  # qk-norm inside the kernel
                norms = dict(q_norm=qk_norm_params(self.q_norm), k_norm=qk_norm_params(self.k_norm))
            else:
                q, k = self.q_norm(q), self.k_norm(k)
            x = ops.attention(q, k, v, self.scale, backend=self.backend, key_padding_mask=attn_mask, **norms)
        else:
            mask = sdpa_mask(attn_mask, x.shape[1])
            x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=mask, scale=self.scale)
        x = x.transpose(1, 2).flatten(2)  # [B, 1, C]
        x = self.proj_drop(self.proj(x))
        if next(mlp_blockers(self.norm, self.mlp, self.mlp.norm, self.training), None) is None:
            x = _fused_ln_mlp(self.norm, self.mlp, x, True, self.mlp.backend)
        else:
            x = x + self.mlp(self.norm(x))
        return x[:, 0]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (timm's names and keys).

    Attention half: while ``attention_half_blockers`` finds nothing that must be called (``ls1`` an Identity or a
    plain LayerScale, drop-path and proj dropout inactive, ``attn``/``attn.proj`` plain fastvit modules without
    hooks), the proj Linear, LayerScale and the residual add are one ``ops.linear_residual`` call. MLP half: while
    ``mlp_half_blockers`` finds nothing (``norm2`` a plain LayerNorm/RmsNorm, ``mlp`` fastvit's ``Mlp`` /
    ``GluMlp`` / ``SwiGLU`` with plain Linears and an activation ``ln_mlp`` computes, no dropout, ``ls2`` an
    Identity or a plain LayerScale, no active drop-path), the norm, fc1, activation, hidden norm, fc2, LayerScale
    and the residual add are one ``ops.ln_mlp`` call. Otherwise the registered modules run one by one, as timm's.
    Drop-path is inactive in eval mode, so a model trained with it still runs fused for inference.
    ``fastvit.fusion.block_fusion`` says which halves run fused and why not; an unfused half also logs at DEBUG on
    the ``"fastvit"`` logger.

    timm's knobs for the modern families: ``mlp_layer`` (``Mlp``, ``SwiGLUPacked``/``GluMlp``, ``SwiGLU``: SiLU-gated
    ones run as ``ln_mlp(act='swiglu')``), ``qk_norm`` (``attn.q_norm``/``attn.k_norm``, a ``norm_layer`` per head),
    ``scale_mlp_norm`` (a ``norm_layer`` on the MLP's hidden layer), ``norm_layer`` (``LayerNorm`` any eps,
    ``RmsNorm``), ``act_layer``.
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
        mlp_layer: Callable[..., nn.Module] = Mlp,
        qk_norm: bool = False,
        scale_mlp_norm: bool = False,
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
            qk_norm=qk_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            norm_layer=norm_layer if scale_mlp_norm else None,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C]; ``attn_mask`` (timm's keyword): see ``fastvit.packing``."""
        why = next(attention_half_blockers(self), None)
        if why is None:
            # proj + bias + LayerScale + residual: one op
            x = self.attn.forward_residual(x, x, attn_mask, norm=self.norm1, layer_scale=self.ls1)
        else:
            if dispatch.debug_enabled():
                dispatch.logger.debug("Block: attention half unfused: %s", why)
            out = self.attn(self.norm1(x)) if attn_mask is None else self.attn(self.norm1(x), attn_mask=attn_mask)
            x = x + drop_path(self.drop_path1, self.ls1(out), attn_mask)
        why = next(mlp_half_blockers(self), None)
        if why is None:
            return _fused_ln_mlp(self.norm2, self.mlp, x, True, self.mlp.backend, self.ls2)
        if dispatch.debug_enabled():
            dispatch.logger.debug("Block: MLP half unfused: %s", why)
        return x + drop_path(self.drop_path2, self.ls2(self.mlp(self.norm2(x))), attn_mask)


class EvaAttention(nn.Module):
    """timm's ``EvaAttention`` (the ``Eva`` class: EVA02, DINOv3, ...): q/k/v from one bias-free ``qkv`` Linear plus
    ``q_bias``/``v_bias`` (k has none: timm's zero ``k_bias`` buffer, not in the state dict), or three Linears
    ``q_proj``/``k_proj``/``v_proj`` (``qkv_fused=False``, k bias-free); optional qk-norm; 2D RoPE on every token but
    the ``num_prefix_tokens`` first; an optional norm before ``proj`` (``scale_norm``, EVA02-CLIP).

    With one packed ``qkv`` Linear and plain qk-norm modules (``prologue_blockers`` finds nothing) the attention is one
    ``ops.qkv_attention`` call on the packed buffer, qk-norm and RoPE its prologue (inside the Triton kernel);
    otherwise q, k, v are [B, H, N, D] views, qk-norm and RoPE run as separate ops and the attention is
    ``ops.attention``. The spec is ``fastvit.reference.qk_norm_attention``.
    """

    op_name = "qkv_attention"

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qkv_fused: bool = True, num_prefix_tokens: int = 1,
        attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: Callable[..., nn.Module] | None = None,
        qk_norm: bool = False, scale_norm: bool = True, rotate_half: bool = False, attn_type: str = "eva",
        device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        _set_heads(self, dim, num_heads)
        if attn_type not in ("eva", "rope"):
            raise ValueError(f"attn_type must be 'eva' or 'rope', got {attn_type!r}")
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or LayerNorm
        k_bias = qkv_bias and attn_type == "rope"  # timm's AttentionRope: plain Linear biases, k's included
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        separate_bias = qkv_bias and not k_bias
        if qkv_fused:
            self.qkv = nn.Linear(dim, dim * 3, bias=k_bias, **dd)
            self.q_proj = self.k_proj = self.v_proj = None
            self.q_bias = nn.Parameter(torch.zeros(dim, **dd)) if separate_bias else None
            self.v_bias = nn.Parameter(torch.zeros(dim, **dd)) if separate_bias else None
        else:
            self.qkv = self.q_bias = self.v_bias = None
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, dim, bias=k_bias, **dd)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        _add_qk_norms(self, qk_norm, norm_layer, dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = ResidualLinear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend: str | None = None

    def packed_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C] -> q, k, v packed as [B, N, 3·C], biases added. With separate projections
        (``qkv_fused=False``) their outputs are concatenated: one copy, cheaper than the rotated q/k copies that the
        module path makes."""
        if self.qkv is None:
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = self.qkv(x)
        if self.q_bias is not None:  # timm adds [q_bias, 0, v_bias] inside the GEMM: the same sums
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return qkv

    def heads(self, x: torch.Tensor, rope: torch.Tensor | None = None):
        """x: [B, N, C]; rope: [N - num_prefix_tokens, 2·D] or None -> q, k, v [B, H, N, D] as attention uses them."""
        if self.qkv is not None:
            qkv = self.packed_qkv(x)
            q, k, v = split_qkv_heads(qkv, self.num_heads)
        else:
            q, k, v = (
                proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope, self.num_prefix_tokens, self.rotate_half).type_as(v)
            k = apply_rope(k, rope, self.num_prefix_tokens, self.rotate_half).type_as(v)
        return q, k, v

    def attend(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: AttnMask = None) -> torch.Tensor:
        """x: [B, N, C] (normalised tokens) -> the heads' outputs [B, N, C] after ``norm``, before proj."""
        rope_prologue = None
        if rope is not None:
            rope_prologue = {
                "rope": rope, "num_prefix_tokens": self.num_prefix_tokens,
                "rope_layout": "half" if self.rotate_half else "interleaved",
            }  # fmt: skip
        out = attend(self, x, attn_mask, lambda: self.packed_qkv(x), lambda: self.heads(x, rope), rope_prologue)
        return self.norm(out)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: AttnMask = None) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C]; ``attn_mask``: see ``fastvit.packing``."""
        return self.proj_drop(self.proj(self.attend(x, rope, attn_mask)))

    def forward_residual(
        self, x: torch.Tensor, residual: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: AttnMask = None,
        layer_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``residual + layer_scale * proj(attention(x))`` as one ``ops.linear_residual`` call (``layer_scale``: the
        block's gamma [C], folded into proj's weight and bias, or None); proj_drop is not applied."""
        proj = self.proj
        out = self.attend(x, rope, attn_mask)
        return ops.linear_residual(out, proj.weight, proj.bias, residual, backend=proj.backend, layer_scale=layer_scale)

    def packed(self) -> bool:
        """True when the attention is one ``ops.qkv_attention`` call with qk-norm and RoPE as its prologue."""
        return next(prologue_blockers(self), None) is None


def attend(
    attn: nn.Module,
    x: torch.Tensor,
    attn_mask: AttnMask,
    packed_qkv: Callable[[], torch.Tensor],
    heads: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    rope_prologue: dict | None = None,
) -> torch.Tensor:
    """The heads' outputs [B, N, C] of an ``Attention`` / ``EvaAttention`` / ``ParallelScalingBlock`` on its tokens x
    [B, N, C] under ``attn_mask`` (see ``fastvit.packing``): the one place that decides how attention runs.

    One op on the packed qkv buffer (``packed_qkv()`` -> [B, N, 3C]) with the qk-norms and RoPE as its prologue while
    ``prologue_blockers`` finds nothing and the mask has such an op (``mask_fits_qkv_call``); else
    q, k, v from ``heads()`` ([B, H, N, D] each, normalised and rotated) through ``heads_attention``.
    ``rope_prologue``: ``ops.qkv_attention``'s rope / num_prefix_tokens / rope_layout keywords, or None."""
    check_attn_mask(attn_mask, x)
    dropout_p = getattr(attn.attn_drop, "p", 0.0) if attn.training else 0.0
    if next(prologue_blockers(attn), None) is None:
        q_norm, k_norm = qk_norm_params(attn.q_norm), qk_norm_params(attn.k_norm)
        if mask_fits_qkv_call(attn_mask, dropout_p):
            return qkv_attention_under(
                attn_mask, packed_qkv(), attn.num_heads, attn.scale, dropout_p, attn.backend,
                q_norm=q_norm, k_norm=k_norm, **(rope_prologue or {}),
            )  # fmt: skip
    return heads_attention(*heads(), attn.scale, dropout_p, attn.backend, attn_mask)


def mask_fits_qkv_call(attn_mask: AttnMask, dropout_p: float) -> bool:
    """True when the attention under ``attn_mask`` is one op on the packed qkv buffer (``qkv_attention_under``):
    no mask or a key-padding mask (``ops.qkv_attention``), or a packing without dropout (``ops.varlen_qkv_attention``
    has none; it takes the qk-norm/RoPE prologue). Other masks run ``heads_attention`` on q, k, v views."""
    if attn_mask is None or is_key_padding_mask(attn_mask):
        return True
    return isinstance(attn_mask, PackedSequences) and dropout_p == 0.0


def qkv_attention_under(
    attn_mask: AttnMask, qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float, backend, **prologue
) -> torch.Tensor:
    """qkv [B, N, 3C] -> [B, N, C] under a mask that ``mask_fits_qkv_call`` accepted."""
    if isinstance(attn_mask, PackedSequences):
        cu_seqlens, max_seqlen = attn_mask
        checked = attn_mask.host_num_tokens is not None  # from_lengths: right by construction, T checked on the host
        return ops.varlen_qkv_attention(
            qkv[0], cu_seqlens, max_seqlen, num_heads, scale, check_seqlens=not checked, backend=backend, **prologue
        )[None]
    return ops.qkv_attention(qkv, num_heads, scale, dropout_p, backend, key_padding_mask=attn_mask, **prologue)


def heads_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float, backend, attn_mask: AttnMask
) -> torch.Tensor:
    """q, k, v [B, H, N, D] -> [B, N, H·D]: ``ops.attention`` (with a key-padding mask too: a sample whose keys are all
    masked gets 0, the spec), or SDPA with the mask's SDPA form (packed sequences, 4-D masks)."""
    if attn_mask is None or is_key_padding_mask(attn_mask):
        out = ops.attention(q, k, v, scale, dropout_p=dropout_p, backend=backend, key_padding_mask=attn_mask)
    else:
        mask = sdpa_mask(attn_mask, q.shape[-2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).flatten(2)


def qk_norm_params(norm: nn.Module) -> QKNorm | None:
    """The ``QKNorm`` that ``ops.qkv_attention``'s prologue applies for a qk-norm module that ``prologue_blockers``
    accepted (None for ``nn.Identity``)."""
    if isinstance(norm, nn.Identity):
        return None
    kind = "rms" if isinstance(norm, RmsNorm) else "layer"
    return QKNorm(norm.weight, getattr(norm, "bias", None), norm.eps, kind)


def prologue_blockers(attn: nn.Module, prefix: str = "attn.") -> Iterator[str]:
    """Why an ``Attention`` / ``EvaAttention``'s q/k path is not ``ops.qkv_attention``'s prologue on the packed qkv
    buffer (an ``AttentionPoolLatent``'s: ``ops.attention``'s). The projections are called, whatever they are; the
    prologue reads the norms' weights instead of calling them, so they must be plain affine LayerNorm / RmsNorm
    modules over the head dim, or ``nn.Identity``. ``prefix``: the module's name in the reasons."""
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name)
        if plain(norm, nn.Identity):
            continue
        if not plain(norm, LayerNorm, nn.LayerNorm, RmsNorm):
            yield f"{prefix}{name} is a {type(norm).__name__} (not a plain LayerNorm/RmsNorm): it is called as a module"
        elif norm.weight is None:
            yield f"{prefix}{name} has no weight (elementwise_affine=False): it is called as a module"
        elif tuple(norm.normalized_shape) != (attn.head_dim,):
            yield f"{prefix}{name} normalises {tuple(norm.normalized_shape)}, not the head dim ({attn.head_dim},)"
    if _global_hooks():
        yield "global module hooks are registered: every module is called"


class EvaBlock(nn.Module):
    """timm's ``EvaBlock``: ``x + gamma_1 * attn(norm1(x), rope)`` then ``x + gamma_2 * mlp(norm2(x))``.

    The same pre-norm block as ``Block`` with timm's ``Eva`` keys: LayerScale is a bare parameter (``gamma_1``,
    ``gamma_2``), the attention is ``EvaAttention`` (RoPE). MLP: ``Mlp`` (GELU, optional sub-LN ``scale_mlp``),
    ``SwiGLU`` (split, with ``scale_mlp`` or ``swiglu_align_to``: EVA02) or ``SwiGLUPacked`` (DINOv3 S+/H+). The MLP
    half is one ``ops.ln_mlp`` call under ``Block``'s rule (a plain GELU ``Mlp``, no LayerScale, no active
    dropout); the attention half runs its modules.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, qkv_fused: bool = True, mlp_ratio: float = 4.0,
        swiglu_mlp: bool = False, swiglu_align_to: int = 0, scale_mlp: bool = False, scale_attn_inner: bool = False,
        num_prefix_tokens: int = 1, rotate_half: bool = False, qk_norm: bool = False, attn_type: str = "eva",
        proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, init_values: float | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] = LayerNorm, device=None,
        dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = EvaAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qkv_fused=qkv_fused, num_prefix_tokens=num_prefix_tokens,
            attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, qk_norm=qk_norm,
            scale_norm=scale_attn_inner, rotate_half=rotate_half, attn_type=attn_type, **dd,
        )  # fmt: skip
        self.init_values = init_values
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values), **dd)) if init_values is not None else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        hidden = int(dim * mlp_ratio)
        mlp_norm = norm_layer if scale_mlp else None
        if swiglu_mlp and (scale_mlp or swiglu_align_to):
            self.mlp = SwiGLU(dim, hidden, norm_layer=mlp_norm, drop=proj_drop, align_to=swiglu_align_to, **dd)
        elif swiglu_mlp:
            self.mlp = GluMlp(dim, hidden * 2, act_layer=nn.SiLU, gate_last=False, drop=proj_drop, **dd)
        else:
            self.mlp = Mlp(dim, hidden, act_layer=act_layer, norm_layer=mlp_norm, drop=proj_drop, **dd)
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values), **dd)) if init_values is not None else None
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def reset_parameters(self) -> None:
        for gamma in (self.gamma_1, self.gamma_2):
            if gamma is not None:
                nn.init.constant_(gamma, self.init_values)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: AttnMask = None) -> torch.Tensor:
        """x: [B, N, C]; rope: [N - T, 2·D] or None; ``attn_mask``: see ``fastvit.packing`` -> [B, N, C]."""
        why = next(eva_attention_half_blockers(self), None)
        if why is None:  # proj + bias + LayerScale (gamma_1) + residual: one op
            x = self.attn.forward_residual(self.norm1(x), x, rope, attn_mask, layer_scale=self.gamma_1)
        else:
            if dispatch.debug_enabled():
                dispatch.logger.debug("EvaBlock: attention half unfused: %s", why)
            out = self.attn(self.norm1(x), rope) if attn_mask is None else self.attn(self.norm1(x), rope, attn_mask)
            x = x + drop_path(self.drop_path1, out if self.gamma_1 is None else self.gamma_1 * out, attn_mask)
        if next(eva_mlp_half_blockers(self), None) is None:
            return _fused_ln_mlp(self.norm2, self.mlp, x, True, self.mlp.backend, self.gamma_2)
        out = self.mlp(self.norm2(x))
        return x + drop_path(self.drop_path2, out if self.gamma_2 is None else self.gamma_2 * out, attn_mask)


def eva_attention_half_blockers(block: EvaBlock) -> Iterator[str]:
    """Why an ``EvaBlock``'s proj, LayerScale (``gamma_1``, a parameter: always folded) and residual add are not one
    ``ops.linear_residual`` call."""
    if not plain(block.attn, EvaAttention):
        yield f"attn is a {type(block.attn).__name__} with hooks or a replaced forward, or not fastvit's EvaAttention"
        return
    yield from _proj_residual_blockers(block)


def eva_mlp_half_blockers(block: EvaBlock) -> Iterator[str]:
    """Why an ``EvaBlock``'s MLP half is not one ``ops.ln_mlp`` call (``mlp_half_blockers`` for timm's Eva keys)."""
    # gamma_2 (LayerScale) is folded into fc2 by ops.ln_mlp.
    if not plain(block.mlp, *MLP_TYPES):
        yield f"mlp is a {type(block.mlp).__name__} with hooks or a replaced forward, not {_MLP_NAMES}"
        return
    yield from _skippable("drop_path2", block.drop_path2, block.training)
    yield from mlp_blockers(block.norm2, block.mlp, block.mlp.norm, block.training)


class ParallelScalingBlock(nn.Module):
    """timm's ``ParallelScalingBlock`` (the ``_xp`` models): attention and MLP side by side on one normalised input,
    ``x + ls(attn_out_proj(attn) + mlp_out_proj(act(fc1)))`` (Dehghani et al., "Scaling Vision Transformers to 22
    Billion Parameters", arXiv:2302.05442).

    timm's keys: ``in_norm``, ``in_proj`` (fc1 and q, k, v in one Linear: [H + 3C, C], H the MLP width first),
    ``mlp_bias`` (fc1's bias when ``qkv_bias=False``; with ``qkv_bias=True`` every bias lives in ``in_proj.bias``),
    ``q_norm``/``k_norm``, ``attn_out_proj`` and ``mlp_out_proj`` (or one ``out_proj`` over [attn, mlp] with
    ``fuse_out_proj``), ``ls``. in_norm, in_proj and the MLP's activation are one ``ops.ln_linear`` call (the norm
    as the GEMM's prologue, the activation on the MLP's columns in its epilogue) where ``in_proj_fusion`` says so.
    The attention is one ``ops.qkv_attention`` call on the in_proj output's [B, N, 3C] slice with qk-norm as its
    prologue (``attend``). While ``parallel_block_blockers`` finds nothing that must be
    called (separate out projections as plain ``ResidualLinear``s, ``ls`` an Identity, no active drop-path or
    dropout), both out projections add into the residual stream inside their GEMMs: two ``ops.linear_residual``
    calls, ``(x + mlp) + attn`` — one rounding order apart from timm's ``x + (attn + mlp)``.
    """

    op_name = "qkv_attention"

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_norm: bool = False,
        scale_attn_norm: bool = False, scale_mlp_norm: bool = False, proj_bias: bool = True, proj_drop: float = 0.0,
        attn_drop: float = 0.0, init_values: float | None = None, drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] = LayerNorm,
        mlp_layer: Callable[..., nn.Module] | None = None,  # timm's signature; the MLP is built in
        fuse_out_proj: bool = False, device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        _set_heads(self, dim, num_heads)
        if scale_attn_norm or scale_mlp_norm:
            raise ValueError("ParallelScalingBlock has no inner norms (scale_attn_norm / scale_mlp_norm), as timm's")
        if mlp_layer not in (None, Mlp):
            raise ValueError(f"ParallelScalingBlock builds its own GELU MLP; mlp_layer={mlp_layer!r} is not supported")
        dd = {"device": device, "dtype": dtype}
        hidden = int(mlp_ratio * dim)
        self.in_split = [hidden, dim, dim, dim]
        self.in_norm = norm_layer(dim, **dd)
        self.in_proj = NormLinear(dim, hidden + 3 * dim, bias=qkv_bias, **dd)
        self.mlp_bias = None if qkv_bias else nn.Parameter(torch.zeros(hidden, **dd))
        _add_qk_norms(self, qk_norm, norm_layer, dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.mlp_drop = nn.Dropout(proj_drop)
        self.mlp_act = act_layer()
        if fuse_out_proj:
            self.out_proj = nn.Linear(dim + hidden, dim, bias=proj_bias, **dd)
            self.attn_out_proj = self.mlp_out_proj = None
        else:
            self.out_proj = None
            self.attn_out_proj = ResidualLinear(dim, dim, bias=proj_bias, **dd)
            self.mlp_out_proj = ResidualLinear(hidden, dim, bias=proj_bias, **dd)
        self.ls = LayerScale(dim, init_values=init_values, **dd) if init_values is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.backend: str | None = None

    def reset_parameters(self) -> None:
        if self.mlp_bias is not None:
            nn.init.zeros_(self.mlp_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, C] (the block input) -> the MLP's pre-activation [B, N, H] and the packed qkv [B, N, 3C] (a
        strided slice of the one in_proj output)."""
        y = self.in_proj(self.in_norm(x))
        x_mlp, qkv = y[..., : self.in_split[0]], y[..., self.in_split[0] :]
        return (x_mlp if self.mlp_bias is None else x_mlp + self.mlp_bias), qkv

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, N, C] (the block input) -> q, k, v [B, heads, N, D] as the attention uses them (after qk-norm)."""
        return self._heads(self.project(x)[1])

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = split_qkv_heads(qkv, self.num_heads)
        return self.q_norm(q), self.k_norm(k), v

    def in_proj_call(self, device: torch.device, dtype: torch.dtype) -> GemmCall:
        """The dispatch key of in_norm + in_proj as one ``ops.ln_linear`` call (``in_proj_fusion``, the fusion
        report)."""
        in_proj = self.in_proj  # a NormLinear, or an adapter in its place (the call is still reported)
        return GemmCall(device, dtype, in_proj.in_features, in_proj.out_features, norm_kind(self.in_norm) is not None)

    def in_proj_fusion(self, x: torch.Tensor) -> dict | None:
        """``ops.ln_linear``'s arguments when in_norm, in_proj and the MLP's activation run as one call on ``x`` (the
        norm as the GEMM's prologue, the activation on the MLP's columns in its epilogue: no normalised copy and no
        separate activation pass): plain modules (``in_proj_blockers``) and dispatch running a fused GEMM for the
        call; else None (the modules run)."""
        if next(in_proj_blockers(self), None) is not None:
            return None
        in_proj = self.in_proj
        if dispatch.selected("ln_linear", in_proj.backend, self.in_proj_call(*linear_call(x))) == "torch":
            return None
        bias = in_proj.bias
        if self.mlp_bias is not None:  # fc1's bias apart from the (bias-free) in_proj: zeros for q, k, v
            bias = torch.cat([self.mlp_bias, self.mlp_bias.new_zeros(3 * in_proj.in_features)])
        norm = self.in_norm
        return dict(
            ln_weight=norm.weight, ln_bias=getattr(norm, "bias", None), weight=in_proj.weight, bias=bias,
            eps=norm.eps, activation=activation_name(self.mlp_act), backend=in_proj.backend, norm=norm_kind(norm),
            activation_columns=self.in_split[0],
        )  # fmt: skip

    def attend(self, x: torch.Tensor, attn_mask: AttnMask = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, C] (the block input) -> the heads' outputs [B, N, C] and the MLP's hidden activations [B, N, H]
        (after ``mlp_act`` and ``mlp_drop``). The in_proj output is one ``ops.ln_linear`` call with the norm and the
        activation fused where ``in_proj_fusion`` says so, else ``project``'s modules then ``mlp_act``. While
        ``prologue_blockers`` finds nothing, one ``ops.qkv_attention`` call reads q, k, v from the in_proj output with
        qk-norm as its prologue; else the norms run first, then ``ops.attention``."""
        fused = self.in_proj_fusion(x)
        if fused is None:
            x_mlp, qkv = self.project(x)
            x_mlp = self.mlp_act(x_mlp)
        else:
            y = ops.ln_linear(x, **fused)
            x_mlp, qkv = y[..., : self.in_split[0]], y[..., self.in_split[0] :]
        return attend(self, x, attn_mask, lambda: qkv, lambda: self._heads(qkv)), self.mlp_drop(x_mlp)

    def forward(self, x: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C]; ``attn_mask``: see ``fastvit.packing``."""
        x_attn, x_mlp = self.attend(x, attn_mask)
        why = next(parallel_block_blockers(self), None)
        if why is None:
            mlp_proj, attn_proj = self.mlp_out_proj, self.attn_out_proj
            x = ops.linear_residual(x_mlp, mlp_proj.weight, mlp_proj.bias, x, backend=mlp_proj.backend)
            return ops.linear_residual(x_attn, attn_proj.weight, attn_proj.bias, x, backend=attn_proj.backend)
        if dispatch.debug_enabled():
            dispatch.logger.debug("ParallelScalingBlock: out projections unfused: %s", why)
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + drop_path(self.drop_path, self.ls(y), attn_mask)


def in_proj_blockers(block: ParallelScalingBlock) -> Iterator[str]:
    """Why a ``ParallelScalingBlock``'s in_norm, in_proj and MLP activation cannot be one ``ops.ln_linear`` call."""
    if norm_kind(block.in_norm) is None:
        yield f"in_norm is a {type(block.in_norm).__name__} (not a plain affine LayerNorm/RmsNorm): it is called"
    elif mixed := norm_dtype_blocker("in_norm", block.in_norm, block.in_proj.weight):
        yield mixed
    if not plain(block.in_proj, NormLinear):
        yield f"in_proj is a {type(block.in_proj).__name__} (an adapter, hook or subclass): it is called"
    if activation_name(block.mlp_act) is None:
        yield f"mlp_act is a {type(block.mlp_act).__name__} (not GELU / GELU-tanh / QuickGELU): it is called"
    if _global_hooks():
        yield "global module hooks are registered: every module is called"


def parallel_block_blockers(block: ParallelScalingBlock) -> Iterator[str]:
    """Why a ``ParallelScalingBlock``'s out projections cannot add into the residual stream inside their GEMMs."""
    if block.out_proj is not None:
        yield "fuse_out_proj: one out_proj over [attn, mlp] runs as a module, then the residual add"
        return
    yield from _skippable("ls", block.ls, block.training)
    yield from _skippable("drop_path", block.drop_path, block.training)
    for name in ("attn_out_proj", "mlp_out_proj"):
        if not plain(getattr(block, name), ResidualLinear):
            yield f"{name} is a {type(getattr(block, name)).__name__} (an adapter, hook or subclass): it is called"
    if _global_hooks():
        yield "global module hooks are registered: every module is called"


# ------------------------------------------------------------------------------------------------
# The fusion rule: what a fused path may skip or read instead of calling.


def plain(module: object, *types: type) -> bool:
    """True when ``module`` is exactly one of ``types`` (no subclass or wrapper), with no hooks and its class's
    own ``forward``: then reading its weights is the same as calling it."""
    return (
        type(module) in types
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not module._backward_hooks
        and not module._backward_pre_hooks
        and "forward" not in module.__dict__
    )


def _global_hooks() -> bool:
    """Module hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook``...)."""
    return bool(
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


def dropout_active(module: nn.Module, training: bool) -> bool:
    """A dropout-like module (``nn.Dropout``, ``DropPath``, ``nn.Identity``) that changes its input in this mode."""
    if isinstance(module, nn.Identity):
        return False
    p = getattr(module, "p", getattr(module, "drop_prob", None))
    return p is None or (training and p > 0.0)  # an unknown module: assume it does something


def _skippable(name: str, module: nn.Module, training: bool) -> Iterator[str]:
    """Reasons a residual-branch module that the fused path does not call (LayerScale slot, drop-path, dropout)
    cannot be skipped: it acts in this mode, or it is not a plain Identity/Dropout/DropPath."""
    if not isinstance(module, (nn.Identity, nn.Dropout, DropPath)):
        yield f"{name} is a {type(module).__name__} (the residual add runs separately)"
    elif dropout_active(module, training):
        yield f"{name} is active while training ({module})"
    elif not plain(module, type(module)):
        yield f"{name} has hooks or a replaced forward"


def _layer_scale_blockers(name: str, module: nn.Module, training: bool) -> Iterator[str]:
    """Reasons a LayerScale slot is not folded into the fused op's GEMM: a plain ``LayerScale`` is, an Identity /
    inactive dropout is skipped (``_skippable``)."""
    if isinstance(module, LayerScale):
        if not plain(module, LayerScale):
            yield f"{name} is a LayerScale with hooks, a subclass or a replaced forward: it is called"
        return
    yield from _skippable(name, module, training)


def attention_half_blockers(block: nn.Module) -> Iterator[str]:
    """Why ``block``'s attention half cannot add its residual inside the proj GEMM (``ops.linear_residual``)."""
    training = block.training
    attn = block.attn
    if not plain(attn, Attention):
        yield f"attn is a {type(attn).__name__} with hooks or a replaced forward, or not fastvit's Attention"
        return
    yield from _layer_scale_blockers("ls1", block.ls1, training)  # folded into proj by ops.linear_residual
    yield from _proj_residual_blockers(block)


def _proj_residual_blockers(block: nn.Module) -> Iterator[str]:
    """What keeps a block's ``attn.proj`` + residual add from being one ``ops.linear_residual`` call, whatever the
    attention: the skipped drop-path / proj dropout acting, proj not a plain ``ResidualLinear``, global hooks."""
    yield from _skippable("drop_path1", block.drop_path1, block.training)
    yield from _skippable("attn.proj_drop", block.attn.proj_drop, block.training)
    if not plain(block.attn.proj, ResidualLinear):
        kind = type(block.attn.proj).__name__
        yield f"attn.proj is a {kind} (an adapter, hook or subclass): it is called unfused"
    if _global_hooks():
        yield "global module hooks are registered: every module is called"


MLP_TYPES = (Mlp, GluMlp, SwiGLU)  # the MLP classes ops.ln_mlp runs
_MLP_NAMES = "fastvit's " + "/".join(t.__name__ for t in MLP_TYPES)


def mlp_blockers(norm: nn.Module, mlp: nn.Module, hidden_norm: nn.Module, training: bool) -> Iterator[str]:
    """Why ``x + mlp(norm(x))`` is not one ``ops.ln_mlp`` call: the modules it reads must be a plain LayerNorm /
    RmsNorm, Linears, an activation ``ln_mlp`` computes, a hidden norm of the first norm's kind (or none), and the
    dropouts it skips inactive."""
    kind = norm_kind(norm)
    if kind is None:
        yield f"the norm is a {type(norm).__name__}, not a plain LayerNorm/RmsNorm with a weight: the MLP runs unfused"
    linears = ("fc1_g", "fc1_x", "fc2") if isinstance(mlp, SwiGLU) else ("fc1", "fc2")
    for name, module, linear in (("the norm", norm, linears[0]), ("mlp.norm", hidden_norm, linears[-1])):
        weight = getattr(getattr(mlp, linear), "weight", None)
        mixed = None if weight is None else norm_dtype_blocker(name, module, weight)
        if mixed:
            yield mixed
    for name in linears:
        linear = getattr(mlp, name)
        if not plain(linear, nn.Linear):
            yield f"mlp.{name} is a {type(linear).__name__} (an adapter, hook or subclass): it is called unfused"
    if isinstance(mlp, SwiGLU) and (mlp.fc1_g.bias is None) != (mlp.fc1_x.bias is None):
        yield "mlp.fc1_g and mlp.fc1_x differ in having a bias"
    if mlp_act(mlp) is None:
        gate = " gating with the second half (gate_last=True)" if getattr(mlp, "gate_last", False) else ""
        yield (
            f"mlp.act is a {type(mlp.act).__name__}{gate}: ln_mlp computes nn.GELU (either form), QuickGELU, and "
            "SiLU gating with the first half; it is called unfused"
        )
    if not plain(hidden_norm, nn.Identity) and (norm_kind(hidden_norm) is None or norm_kind(hidden_norm) != kind):
        yield f"mlp.norm is a {type(hidden_norm).__name__}, not a plain norm of the first norm's kind: called unfused"
    drops = [(name, getattr(mlp, name)) for name in ("drop1", "drop2")]
    if any(dropout_active(d, training) for _, d in drops):
        yield f"MLP dropout is active while training (p={getattr(drops[0][1], 'p', '?')})"
    elif not all(plain(d, type(d)) and isinstance(d, (nn.Dropout, nn.Identity)) for _, d in drops):
        yield "the MLP's dropout modules are not plain nn.Dropout/nn.Identity"
    if _global_hooks():
        yield "global module hooks are registered: every module is called"


def mlp_half_blockers(block: nn.Module) -> Iterator[str]:
    """Why ``block``'s MLP half is not one ``ops.ln_mlp`` call with the residual inside."""
    training = block.training
    if not plain(block.mlp, *MLP_TYPES):
        yield f"mlp is a {type(block.mlp).__name__} with hooks or a replaced forward, not {_MLP_NAMES}"
        return
    yield from _layer_scale_blockers("ls2", block.ls2, training)  # folded into fc2 by ops.ln_mlp
    yield from _skippable("drop_path2", block.drop_path2, training)
    yield from mlp_blockers(block.norm2, block.mlp, block.mlp.norm, training)
