"""Patch embedding: ``fastvit.ops.patch_embed`` (image -> [B, T+N, D] tokens) and ``patch_embed_uint8``.

Conv-equivalent projection of non-overlapping PH×PW patches (kernel = stride = patch), an optional LayerNorm or
RMSNorm of the projected patch tokens (timm's ``PatchEmbed(norm_layer=...)``: AIMv2), plus the position embedding
and the prefix (class / register) tokens, as one op.

Backends:
  ``torch``   ``F.conv2d`` + flatten + prefix concat + position add (timm's path); every float dtype.
  ``triton``  ``fastvit/ops/triton/patch_embed.py``: one launch computes the implicit-im2col GEMM (patches
              gathered by strides, NCHW, channels_last or any view, never copied), the bias, the norm (a
              full-row epilogue: each program owns whole rows of D), the position embedding and the prefix rows,
              straight into the [B, T+N, D] buffer; float16, bfloat16, float32.
The spec both are tested against is ``fastvit.reference.patch_embed``.

``patch_embed_uint8`` is the inference-pipeline entry point: decoded ``uint8`` images ([B, H, W, C] or
[B, C, H, W]) are normalised as ``(x / 255 - mean[c]) / std[c]`` (torchvision's ``Normalize(mean, std)``
applied to ``x.float() / 255``); the Triton kernel does it while gathering patches, so no float copy of the
batch is ever made. No gradient flows to the images; weight, bias, pos_embed and cls_token still get theirs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastvit import dispatch, reference
from fastvit.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # the one definition, re-exported here
from fastvit.ops.attention import QKNorm
from fastvit.validation import (
    autocast_dtype,
    check_eps,
    check_same_device,
    check_same_dtype_outside_autocast,
    check_shape,
    check_tensor,
)

NORMS = ("layer", "rms")  # as ops.ln_linear's ``norm``


class PatchEmbedCall(NamedTuple):
    """What a backend's ``supports`` may read about a patch-embedding call (see ``fastvit.dispatch``)."""

    device: torch.device
    dtypes: tuple[torch.dtype, ...]  # the float tensors' dtypes (image included for the float op)
    autocast_dtype: torch.dtype | None
    in_chans: int
    uint8: bool
    norm: str | None = None  # the norm of the patch tokens: 'layer' | 'rms', or None


# The norm ``patch_embed`` applies to the projected patch tokens (timm's ``patch_embed.norm``): the same record as the
# qk-norm of ``qkv_attention`` (weight [D], bias [D] or None, eps, kind 'layer' | 'rms').
EmbedNorm = QKNorm


def patch_embed_call(
    device: torch.device, *tensors: torch.Tensor | None, in_chans: int, uint8: bool = False, norm: str | None = None
):
    """The call signature of a patch embedding of ``tensors`` (the float ones) on ``device``; ``norm``: the kind of
    its patch-token norm, or None."""
    dtypes = tuple(dict.fromkeys(t.dtype for t in tensors if t is not None))
    return PatchEmbedCall(device, dtypes, autocast_dtype(device), in_chans, uint8, norm)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    backend: str | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm: str = "layer",
) -> torch.Tensor:
    """Cut ``x`` into patches, project them, normalise them (optional), add position embeddings, prepend prefix
    tokens: ``[prefix | Norm(im2col(x)·Wᵀ + b)] + pos_embed``.

    Args:
        x: [B, Cin, H, W] image batch, H and W divisible by the patch size P (any memory format).
        weight: [D, Cin, P, P] projection (a Conv2d weight with stride P).
        bias: [D] or None.
        pos_embed: [1, T+N, D] added to all tokens, or [1, N, D] added to the N = (H/P)·(W/P)
            patch tokens only (timm's ``no_embed_class``); or None.
        cls_token: [1, T, D] prefix tokens (class and/or register tokens), or None.
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.
        norm_weight: [D] weight of a norm over D of the projected patch tokens (timm's ``patch_embed.norm``,
            AIMv2's RMSNorm), applied before the position embedding and never to the prefix tokens; None: no norm.
        norm_bias: [D] LayerNorm bias, or None (always None for RMSNorm).
        norm_eps: the norm's epsilon.
        norm: 'layer' (LayerNorm) or 'rms' (RMSNorm): the kind of the norm when ``norm_weight`` is given (as
            ``ops.ln_linear``'s ``norm``).

    Returns:
        [B, T+N, D].
    """
    check_tensor("x", x, ndim=4)
    _check_patch_args("x", x, weight, bias, pos_embed, cls_token)
    embed_norm = _check_embed_norm(weight, norm_weight, norm_bias, norm_eps, norm)
    check_same_device(x=x, weight=weight, norm_weight=norm_weight, norm_bias=norm_bias)
    tensors = dict(x=x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    check_same_dtype_outside_autocast(x.device, **tensors, norm_weight=norm_weight, norm_bias=norm_bias)
    call = patch_embed_call(
        x.device, *tensors.values(), norm_weight, norm_bias, in_chans=weight.shape[1], norm=_kind(embed_norm)
    )
    impl = dispatch.select("patch_embed", backend, call)
    if embed_norm is None:
        return impl(x, weight, bias, pos_embed, cls_token)
    return impl(x, weight, bias, pos_embed, cls_token, embed_norm)


def patch_embed_uint8(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    channels_last: bool = True,
    backend: str | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm: str = "layer",
) -> torch.Tensor:
    """``patch_embed`` of decoded 8-bit images, normalised on the fly: ``x = (images / 255 - mean[c]) / std[c]``.

    The normalisation is torchvision's ``Normalize(mean, std)`` applied to ``images.float() / 255``, evaluated
    in fp32 (fp64 when ``weight`` is fp64) and then rounded to ``weight``'s dtype, the dtype of the GEMM. The
    Triton kernel evaluates it as ``images · (1 / (255·std)) + (-mean / std)`` per pixel in fp32 (equal up to
    fp32 rounding) while gathering patches: the batch is read once, as bytes.

    Args:
        images: uint8 [B, H, W, C] (``channels_last=True``, as decoders produce) or [B, C, H, W].
        weight: [D, C, P, P] projection (a Conv2d weight with stride P); its dtype is the compute dtype.
        bias: [D] or None.
        pos_embed: [1, T+N, D] or [1, N, D] (patch tokens only), or None.
        cls_token: [1, T, D] prefix tokens, or None.
        mean: C per-channel means, in units of the [0, 1] image (ImageNet's by default).
        std: C per-channel standard deviations, positive (ImageNet's by default).
        channels_last: layout of ``images``: True for [B, H, W, C], False for [B, C, H, W].
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.
        norm_weight, norm_bias, norm_eps, norm: the norm of the patch tokens, as ``patch_embed``'s.

    Returns:
        [B, T+N, D] in ``weight``'s dtype (under CUDA autocast: as ``patch_embed`` under autocast). Inference
        only for the images (integers get no gradient); weight, bias, pos_embed and cls_token are
        differentiable.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"images must be a uint8 tensor (decoded 8-bit images), got {images.dtype}; "
            "use fastvit.ops.patch_embed for float images"
        )
    if images.dim() != 4:
        layout = "[B, H, W, C]" if channels_last else "[B, C, H, W]"
        raise ValueError(f"images must have 4 dimensions {layout}, got shape {tuple(images.shape)}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    x = images.permute(0, 3, 1, 2) if channels_last else images  # [B, C, H, W] view, no copy
    _check_patch_args("images", x, weight, bias, pos_embed, cls_token)
    embed_norm = _check_embed_norm(weight, norm_weight, norm_bias, norm_eps, norm)
    check_same_device(images=x, weight=weight, norm_weight=norm_weight, norm_bias=norm_bias)
    tensors = dict(weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    check_same_dtype_outside_autocast(x.device, **tensors, norm_weight=norm_weight, norm_bias=norm_bias)
    in_chans = weight.shape[1]
    mean = _check_channel_values("mean", mean, in_chans, positive=False)
    std = _check_channel_values("std", std, in_chans, positive=True)
    call = patch_embed_call(
        x.device, *tensors.values(), norm_weight, norm_bias, in_chans=in_chans, uint8=True, norm=_kind(embed_norm)
    )
    impl = dispatch.select("patch_embed_uint8", backend, call)
    if embed_norm is None:
        return impl(x, weight, bias, pos_embed, cls_token, mean, std)
    return impl(x, weight, bias, pos_embed, cls_token, mean, std, embed_norm)


def _check_embed_norm(weight, norm_weight, norm_bias, norm_eps, norm) -> EmbedNorm | None:
    """The patch-token norm's arguments, checked against the projection ``weight`` [D, Cin, PH, PW]."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm_weight is None:
        if norm_bias is not None:
            raise ValueError("norm_bias given without norm_weight: a norm of the patch tokens needs its weight")
        return None
    if norm == "rms" and norm_bias is not None:
        raise ValueError("norm_bias must be None with norm='rms' (RMSNorm has no bias)")
    embed_dim = weight.shape[0]
    for name, value in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if value is not None:
            check_tensor(name, value, ndim=1)
            check_shape(name, value, (embed_dim,), "the embedding dim D of weight")
    return EmbedNorm(norm_weight, norm_bias, check_eps(norm_eps, "norm_eps"), norm)


def _kind(embed_norm: EmbedNorm | None) -> str | None:
    return None if embed_norm is None else embed_norm.kind


def _check_patch_args(x_name, x, weight, bias, pos_embed, cls_token) -> None:
    """Shapes and devices shared by both entry points; ``x`` is (a view of) the [B, Cin, H, W] batch."""
    check_tensor("weight", weight, ndim=4)
    embed_dim, in_chans, patch_h, patch_w = weight.shape
    if min(weight.shape) == 0:
        raise ValueError(
            f"weight must have shape [D, Cin, PH, PW] with every size >= 1 (embed dim, input channels, patch size), "
            f"got {tuple(weight.shape)}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{x_name} must have {in_chans} channels (weight is {tuple(weight.shape)}), got shape {tuple(x.shape)}"
        )
    height, width = x.shape[-2:]
    if height == 0 or width == 0:
        raise ValueError(
            f"image size {height}x{width} holds no patch; {x_name} must be at least one {patch_h}x{patch_w} patch"
        )
    if height % patch_h != 0 or width % patch_w != 0:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch_h}x{patch_w}; "
            "resize or crop the input to a multiple of the patch size"
        )
    num_patches = (height // patch_h) * (width // patch_w)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (embed_dim,), "the embedding dim D of weight")
    num_prefix = 0
    if cls_token is not None:
        check_tensor("cls_token", cls_token, ndim=3)
        if cls_token.shape[0] != 1 or cls_token.shape[2] != embed_dim:
            raise ValueError(f"cls_token must have shape [1, T, {embed_dim}], got {tuple(cls_token.shape)}")
        num_prefix = cls_token.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        allowed = {num_patches + num_prefix, num_patches}
        if pos_embed.shape[0] != 1 or pos_embed.shape[2] != embed_dim or pos_embed.shape[1] not in allowed:
            raise ValueError(
                f"pos_embed must have shape [1, {num_patches + num_prefix}, {embed_dim}] (all tokens) or "
                f"[1, {num_patches}, {embed_dim}] (patch tokens only) for a {height}x{width} image with "
                f"{patch_h}x{patch_w} patches and {num_prefix} prefix tokens; got {tuple(pos_embed.shape)} "
                "(resample it with fastvit.layers.resample_abs_pos_embed for another image size)"
            )
    check_same_device(**{x_name: x}, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)


def _check_channel_values(name: str, values: object, in_chans: int, positive: bool) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise TypeError(f"{name} must be a sequence of floats or a CPU tensor (read once on the host)")
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of {in_chans} floats, got {type(values).__name__}")
    if len(values) != in_chans or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError(f"{name} must be {in_chans} finite numbers (one per channel), got {values!r}")
    if positive and not all(v > 0 for v in values):
        raise ValueError(f"{name} must be positive, got {values!r}")
    return tuple(float(v) for v in values)


# ------------------------------------------------------------------------------------------------
# The torch backend: conv2d as timm's PatchEmbed, then the prefix tokens and the position embedding.


@dispatch.register("patch_embed", "torch")
def _patch_embed_torch(x, weight, bias, pos_embed, cls_token, norm: EmbedNorm | None = None):
    tokens = F.conv2d(_canonical_strides(x), weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)
    if norm is not None:
        tokens = embed_norm_torch(tokens, norm)
    return prefix_and_position(tokens, pos_embed, cls_token)


def embed_norm_torch(tokens: torch.Tensor, norm: EmbedNorm) -> torch.Tensor:
    """The patch-token norm in plain PyTorch (``F.layer_norm`` / ``F.rms_norm``) on [B, N, D] tokens."""
    if norm.kind == "rms":
        return F.rms_norm(tokens, tokens.shape[-1:], norm.weight, norm.eps)
    return F.layer_norm(tokens, tokens.shape[-1:], norm.weight, norm.bias, norm.eps)


def _canonical_strides(x: torch.Tensor) -> torch.Tensor:
    """A contiguous ``x`` whose size-1 dimensions carry odd strides (a 1-channel image that went through a
    channels_last permute looks channels_last too) as a view with the standard strides: same memory, no copy.
    Otherwise conv2d may pick channels_last and return the weight gradient in that layout, which DDP then warns
    about on every step ("grad strides do not match bucket view strides")."""
    if not x.is_contiguous():
        return x
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= size
    strides = tuple(reversed(strides))
    return x if x.stride() == strides else x.as_strided(x.shape, strides)


def prefix_and_position(
    tokens: torch.Tensor, pos_embed: torch.Tensor | None, cls_token: torch.Tensor | None
) -> torch.Tensor:
    """[B, N, D] patch tokens -> [B, T+N, D]: prepend ``cls_token`` [1, T, D], add ``pos_embed`` ([1, T+N, D], or
    [1, N, D] for the patch tokens only). The part of ``patch_embed`` after the projection, as timm's
    ``_pos_embed``; also what a patch embedding with a non-plain projection runs after calling it."""
    if pos_embed is not None and pos_embed.shape[1] == tokens.shape[1]:  # patch tokens only (no_embed_class)
        tokens = tokens + pos_embed
        pos_embed = None
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    return tokens if pos_embed is None else tokens + pos_embed


@dispatch.register("patch_embed_uint8", "torch")
def _patch_embed_uint8_torch(x, weight, bias, pos_embed, cls_token, mean, std, norm: EmbedNorm | None = None):
    images = reference.normalize_uint8(x, mean, std, weight.dtype)  # the definition (torchvision's Normalize)
    return _patch_embed_torch(images, weight, bias, pos_embed, cls_token, norm)
