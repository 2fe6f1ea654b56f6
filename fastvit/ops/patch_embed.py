"""Patch embedding: ``fastvit.ops.patch_embed`` (image -> [B, T+N, D] tokens) and ``patch_embed_uint8``.

Conv-equivalent projection of non-overlapping PH×PW patches (kernel = stride = patch), plus the
position embedding and the prefix (class / register) tokens, as one op.

Backends:
  ``torch``   the reference (``fastvit.reference.patch_embed``); every float dtype.
  ``triton``  ``fastvit.kernels.patch_embed``: one launch computes the implicit-im2col GEMM (patches gathered
              by strides, NCHW, channels_last or any view, never copied), the bias, the position embedding
              and the prefix rows, straight into the [B, T+N, D] buffer. float16, bfloat16 and float32
              (fp32 accumulation; fp32 GEMMs in full precision, no tf32). Backward: dX (when the image needs
              a gradient), dW (split over the B·N patch rows: a fixed-order sum of fp32 partials in
              deterministic mode, fp32 atomics otherwise), and dbias / dpos_embed / dcls_token from one
              batch column-sum of dY (fixed order, no atomics, in both modes).

``patch_embed_uint8`` is the inference-pipeline entry point: decoded ``uint8`` images ([B, H, W, C] or
[B, C, H, W]) are normalised inside the kernel as ``(x / 255 - mean[c]) / std[c]`` (torchvision's
``Normalize(mean, std)`` applied to ``x.float() / 255``), so no float copy of the batch is ever made. No
gradient flows to the images; weight, bias, pos_embed and cls_token still get theirs.

The Triton path is registered as ``torch.library`` custom ops (``fastvit::patch_embed_fwd``,
``fastvit::patch_embed_bwd_input``, ``fastvit::patch_embed_bwd_weight``, ``fastvit::patch_embed_bwd_colsum``)
with fake impls and autograd, so ``torch.compile(fullgraph=True)`` keeps them as opaque nodes; the launches
allocate with ``torch.empty``/``torch.zeros`` only and never synchronise with the host (CUDA-graph capturable
once compiled, i.e. after one warm-up call). Under ``torch.autocast`` on CUDA the GEMM runs in the autocast
dtype: the weight is cast (as autocast casts a conv's), the image is not copied (its tiles are converted in
the kernel), and the output dtype is the reference's under autocast (the autocast dtype, promoted with
``pos_embed``'s dtype when there is one).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch

from fastvit import dispatch, reference
from fastvit.ops._validate import (
    check_same_device,
    check_same_dtype,
    check_same_dtype_outside_autocast,
    check_shape,
    check_tensor,
)

normalize_uint8 = reference.normalize_uint8  # the uint8 path's spec, re-exported
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_UINT8_CHANNELS = 4  # the Triton uint8 path takes mean/std as 4 scalar kernel arguments


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cut ``x`` into patches, project them, add position embeddings, prepend prefix tokens.

    Args:
        x: [B, Cin, H, W] image batch, H and W divisible by the patch size P (any memory format).
        weight: [D, Cin, P, P] projection (a Conv2d weight with stride P).
        bias: [D] or None.
        pos_embed: [1, T+N, D] added to all tokens, or [1, N, D] added to the N = (H/P)·(W/P)
            patch tokens only (timm's ``no_embed_class``); or None.
        cls_token: [1, T, D] prefix tokens (class and/or register tokens), or None.
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.

    Returns:
        [B, T+N, D].
    """
    check_tensor("x", x, ndim=4)
    _check_patch_args("x", x, weight, bias, pos_embed, cls_token)
    check_same_dtype_outside_autocast(x.device, x=x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    why = _uncovered_by_kernels(x.device, x, weight, bias, pos_embed, cls_token)
    backend = dispatch.reference_for_uncovered_input("patch_embed", backend, x.device, why)
    return dispatch.implementation("patch_embed", backend, x.device)(x, weight, bias, pos_embed, cls_token)


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
    check_same_dtype_outside_autocast(x.device, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    in_chans = weight.shape[1]
    mean = _check_channel_values("mean", mean, in_chans, positive=False)
    std = _check_channel_values("std", std, in_chans, positive=True)
    why = _uncovered_by_kernels(x.device, weight, bias, pos_embed, cls_token)
    if in_chans > MAX_UINT8_CHANNELS:
        why = f"{in_chans} channels (the uint8 Triton path takes up to {MAX_UINT8_CHANNELS})"
    backend = dispatch.reference_for_uncovered_input("patch_embed_uint8", backend, x.device, why)
    impl = dispatch.implementation("patch_embed_uint8", backend, x.device)
    return impl(x, weight, bias, pos_embed, cls_token, mean, std)


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


def _uncovered_by_kernels(device: torch.device, *tensors: torch.Tensor | None) -> str | None:
    """What the Triton kernels do not cover in these tensors (float64, mixed dtypes outside autocast), or None;
    ``auto`` then runs the reference, an explicit backend raises its own clear error."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if not dtypes <= set(TRITON_DTYPES):
        return f"dtypes {sorted(map(str, dtypes))} (the Triton kernels take float16, bfloat16, float32)"
    if len(dtypes) > 1 and _autocast_dtype(device) is None:
        return f"mixed dtypes {sorted(map(str, dtypes))} outside autocast"
    return None


@dispatch.register("patch_embed", "torch")
def _patch_embed_torch(x, weight, bias, pos_embed, cls_token):
    return reference.patch_embed(x, weight, bias, pos_embed, cls_token)


@dispatch.register("patch_embed_uint8", "torch")
def _patch_embed_uint8_torch(x, weight, bias, pos_embed, cls_token, mean, std):
    return reference.patch_embed(
        reference.normalize_uint8(x, mean, std, weight.dtype), weight, bias, pos_embed, cls_token
    )


# ------------------------------------------------------------------------------------------------
# Triton backend: dtype rules and autocast, then the launchers and the custom ops.


def _check_triton_dtypes(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"patch_embed: the 'triton' backend supports float16, bfloat16 and float32, got {name} of dtype "
                f"{tensor.dtype}; use backend='torch' for {tensor.dtype}"
            )


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


@dispatch.register("patch_embed", "triton")
def _patch_embed_triton(x, weight, bias, pos_embed, cls_token):
    _check_triton_dtypes(x=x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    amp_dtype = _autocast_dtype(x.device)
    if amp_dtype is not None:
        weight = weight.to(amp_dtype)  # as autocast casts a conv weight; x is converted tile by tile in the kernel
    else:
        check_same_dtype(x=x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    return torch.ops.fastvit.patch_embed_fwd(x, weight, bias, pos_embed, cls_token, None, None)


@dispatch.register("patch_embed_uint8", "triton")
def _patch_embed_uint8_triton(x, weight, bias, pos_embed, cls_token, mean, std):
    _check_triton_dtypes(weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    if x.shape[1] > MAX_UINT8_CHANNELS:
        raise ValueError(
            f"patch_embed_uint8: the 'triton' backend supports at most {MAX_UINT8_CHANNELS} channels, got "
            f"{x.shape[1]}; use backend='torch'"
        )
    amp_dtype = _autocast_dtype(x.device)
    if amp_dtype is not None:
        weight = weight.to(amp_dtype)
    else:
        check_same_dtype(weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    return torch.ops.fastvit.patch_embed_fwd(x, weight, bias, pos_embed, cls_token, scale, shift)


# ------------------------------------------------------------------------------------------------
# Launchers. Tile sizes come from a fixed heuristic (no autotuning: nothing is benchmarked on the first
# call, so a warm-up call is all CUDA-graph capture needs); tests override them through _CONFIG_OVERRIDES.

_CONFIG_OVERRIDES: dict[str, dict] = {}  # kernel kind -> config entries to replace (tests: tiny tiles, splits)
_GEMM_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _new_output(shape, dtype: torch.dtype, device: torch.device, memory_format=torch.contiguous_format):
    """Allocate a kernel output (uninitialised: the kernels write every element). Tests swap this hook for
    one that poisons the buffer with NaN, to catch missing stores."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _kernels():
    from fastvit.kernels import patch_embed as patch_embed_kernels  # imported on first use: triton is optional

    return patch_embed_kernels


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(n - 1, 0).bit_length()))


@functools.cache
def _num_sms(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def _on_gpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda" and not dispatch.triton_interpreter_enabled()


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs in full precision (DESIGN numerics rule: fp32 within ~1e-5, tf32 off).
    return "ieee" if dtype == torch.float32 else "tf32"


def _config(
    kind: str, tensor: torch.Tensor, gemm_dtype: torch.dtype, rows: int, cols: int, red: int, patch_w: int
) -> dict:
    """Tile sizes of one kernel: ``rows`` × ``cols`` outputs reduced over ``red`` (see each launcher)."""
    narrow = gemm_dtype != torch.float32
    if not _on_gpu(tensor):  # Triton's interpreter: large tiles mean fewer (slow, Python-level) programs
        config = dict(BLOCK_R=_pow2(rows, 16, 64), BLOCK_C=_pow2(cols, 16, 64), BLOCK_RED=_pow2(red, 16, 64))
        config.update(num_warps=4, num_stages=1)
    else:
        num_sms = _num_sms(tensor.device.index)
        block_c = _pow2(cols, 16, 128)
        block_r = 128 if _cdiv(rows, 128) * _cdiv(cols, block_c) >= num_sms else 64
        block_red = _pow2(red, 16, 64 if narrow else 32)
        warps = 8 if block_r * block_c >= 128 * 128 else 4
        if _narrow_gather(tensor, patch_w):
            # 8 warps, a 32-wide K tile for the forward at 128 rows and at most 64 K columns for dX keep narrow gathers
            # spill-free on sm_80 and sm_90 with Triton 3.6 and 3.8 (python -m fastvit.kernels.resources).
            warps = 8
            if kind == "fwd" and block_r == 128:
                block_red = min(block_red, 32)
            elif kind == "bwd_input":  # its columns are K
                block_c = min(block_c, 64)
        config = dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_RED=block_red, num_warps=warps, num_stages=3)
    config.update(_CONFIG_OVERRIDES.get(kind, {}))
    return config


def _geometry(x: torch.Tensor, weight: torch.Tensor, num_tokens: int) -> dict:
    batch, in_chans, height, width = x.shape
    embed_dim, _, patch_h, patch_w = weight.shape
    grid_w = width // patch_w
    num_patches = (height // patch_h) * grid_w
    return dict(
        B=batch,
        C=in_chans,
        D=embed_dim,
        PH=patch_h,
        PW=patch_w,
        GW=max(grid_w, 1),
        N=num_patches,
        T=num_tokens - num_patches,
        L=num_tokens,
        K=in_chans * patch_h * patch_w,
    )


def _narrow_gather(x: torch.Tensor, patch_w: int) -> bool:
    """Patches are gathered with narrow loads held in registers (no 16-byte vectors, no async copies): channel-innermost
    images, or patch rows not a multiple of 8 pixels wide (ViT-*/14). Such kernels need more warps not to spill."""
    return _channels_inner(x) or patch_w % 8 != 0


def _channels_inner(x: torch.Tensor) -> bool:
    """Order K channel-innermost when the channel stride is the smallest (channels_last memory)."""
    return x.shape[1] > 1 and x.stride(1) < x.stride(3)


def _norm_args(norm_scale, norm_shift) -> tuple[float, ...]:
    if norm_scale is None:
        return (1.0,) * 4 + (0.0,) * 4
    pad = MAX_UINT8_CHANNELS - len(norm_scale)
    return (*norm_scale, *([1.0] * pad), *norm_shift, *([0.0] * pad))


def _out_dtype(weight: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.dtype:
    """The reference's output dtype: the GEMM's (weight's), promoted with pos_embed's (matters under autocast)."""
    return weight.dtype if pos_embed is None else torch.promote_types(weight.dtype, pos_embed.dtype)


def _forward(x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift) -> torch.Tensor:
    num_prefix = 0 if cls_token is None else cls_token.shape[1]
    num_patches = (x.shape[2] // weight.shape[2]) * (x.shape[3] // weight.shape[3])
    g = _geometry(x, weight, num_prefix + num_patches)
    out = _new_output((g["B"], g["L"], g["D"]), _out_dtype(weight, pos_embed), x.device)
    num_rows = g["B"] * g["L"]
    if out.numel() == 0:
        return out
    cfg = _config("fwd", x, weight.dtype, num_rows, g["D"], g["K"], g["PW"])
    dummy = weight  # stands in for absent tensors (their HAS_* flag is off: never read)
    pos_offset = 0 if pos_embed is None or pos_embed.shape[1] == g["L"] else g["T"]
    grid = (_cdiv(num_rows, cfg["BLOCK_R"]) * _cdiv(g["D"], cfg["BLOCK_C"]),)
    with _device_guard(x):
        _kernels().patch_embed_fwd_kernel[grid](
            x, weight,
            dummy if bias is None else bias,
            dummy if pos_embed is None else pos_embed,
            dummy if cls_token is None else cls_token,
            out,
            num_rows, g["T"], g["L"], g["D"], g["K"], g["GW"], pos_offset,
            *x.stride(), *weight.stride(),
            0 if bias is None else bias.stride(0),
            *((0, 0) if pos_embed is None else pos_embed.stride()[1:]),
            *((0, 0) if cls_token is None else cls_token.stride()[1:]),
            *_norm_args(norm_scale, norm_shift),
            IN_CHANS=g["C"], PATCH_H=g["PH"], PATCH_W=g["PW"], CHANNELS_INNER=_channels_inner(x),
            NORMALIZE=norm_scale is not None, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
            HAS_PREFIX=g["T"] > 0, INPUT_PRECISION=_input_precision(weight.dtype),
            BLOCK_M=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_RED"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return out


def _dx_memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _backward_input(grad, x, weight) -> torch.Tensor:
    """dX [B, Cin, H, W] in x's dtype (dense, x's memory format): dY·W scattered back to the pixels."""
    g = _geometry(x, weight, grad.shape[1])
    dx = _new_output(tuple(x.shape), x.dtype, x.device, _dx_memory_format(x))
    num_rows = g["B"] * g["N"]
    if dx.numel() == 0:
        return dx
    cfg = _config("bwd_input", x, weight.dtype, num_rows, g["K"], g["D"], g["PW"])
    grid = (_cdiv(num_rows, cfg["BLOCK_R"]) * _cdiv(g["K"], cfg["BLOCK_C"]),)
    with _device_guard(x):
        _kernels().patch_embed_bwd_input_kernel[grid](
            grad, weight, dx,
            num_rows, g["T"], g["N"], g["D"], g["K"], g["GW"],
            *grad.stride(), *weight.stride(), *dx.stride(),
            IN_CHANS=g["C"], PATCH_H=g["PH"], PATCH_W=g["PW"], CHANNELS_INNER=_channels_inner(dx),
            INPUT_PRECISION=_input_precision(weight.dtype),
            BLOCK_M=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_C"], BLOCK_D=cfg["BLOCK_RED"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return dx


def _backward_weight(grad, x, weight, norm_scale, norm_shift) -> torch.Tensor:
    """dW [D, Cin, PH, PW] (contiguous, weight's dtype) = dYᵀ·im2col(x) over the B·N patch rows."""
    g = _geometry(x, weight, grad.shape[1])
    shape = (g["D"], g["C"], g["PH"], g["PW"])
    num_rows = g["B"] * g["N"]
    if num_rows == 0 or weight.numel() == 0:
        return torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    # Output tiles D×K, reduced over the rows. Split the rows when the tiles alone do not fill the GPU (keeping
    # at least 8 row blocks per split); the split depends on shapes and device only, so reruns are bit-identical.
    if _on_gpu(x):
        cfg = dict(BLOCK_D=64, BLOCK_K=64, BLOCK_M=64 if weight.dtype != torch.float32 else 32, num_stages=3)
        cfg.update(num_warps=8 if _narrow_gather(x, g["PW"]) else 4)  # 4 warps spill on sm_80
    else:
        cfg = dict(BLOCK_D=_pow2(g["D"], 16, 64), BLOCK_K=_pow2(g["K"], 16, 64), BLOCK_M=_pow2(num_rows, 16, 64))
        cfg.update(num_warps=4, num_stages=1)
    cfg.update(_CONFIG_OVERRIDES.get("bwd_weight", {}))
    block_d, block_k, block_m = cfg["BLOCK_D"], cfg["BLOCK_K"], cfg["BLOCK_M"]
    tiles = _cdiv(g["D"], block_d) * _cdiv(g["K"], block_k)
    row_blocks = _cdiv(num_rows, block_m)
    split = max(1, min(_cdiv(2 * _num_sms(x.device.index), tiles), row_blocks // 8, 16)) if _on_gpu(x) else 1
    split = cfg.get("split", split)
    rows_per_split = _cdiv(row_blocks, split) * block_m
    split = _cdiv(num_rows, rows_per_split)  # no empty splits
    atomic = split > 1 and not dispatch.deterministic_enabled()
    if split == 1:
        work = _new_output(shape, weight.dtype, weight.device)
    elif atomic:
        work = torch.zeros(shape, dtype=torch.float32, device=weight.device)
    else:
        work = _new_output((split, *shape), torch.float32, weight.device)
    with _device_guard(x):
        _kernels().patch_embed_bwd_weight_kernel[(tiles, split)](
            grad, x, work,
            num_rows, rows_per_split, g["T"], g["N"], g["D"], g["K"], g["GW"],
            *grad.stride(), *x.stride(), *_norm_args(norm_scale, norm_shift),
            IN_CHANS=g["C"], PATCH_H=g["PH"], PATCH_W=g["PW"], CHANNELS_INNER=_channels_inner(x),
            NORMALIZE=norm_scale is not None, ATOMIC=atomic, GEMM_DTYPE=_GEMM_DTYPE_CODES[weight.dtype],
            INPUT_PRECISION=_input_precision(weight.dtype),
            BLOCK_D=block_d, BLOCK_K=block_k, BLOCK_M=block_m,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    if split == 1:
        return work
    if not atomic:
        work = work.sum(0)  # fixed-order reduction of the partials: deterministic
    return work.to(weight.dtype)


def _backward_colsum(grad) -> torch.Tensor:
    """S [L, D] fp32 = Σ_b dY[b]: dcls = S[:T], dpos = S or S[T:], dbias = Σ_{l≥T} S[l]."""
    batch, num_tokens, embed_dim = grad.shape
    sums = _new_output((num_tokens, embed_dim), torch.float32, grad.device)
    if sums.numel() == 0:
        return sums
    if batch == 0:
        return sums.zero_()
    block_d = _pow2(embed_dim, 16, 128)
    block_b = _pow2(batch, 1, 16)
    block_d = _CONFIG_OVERRIDES.get("colsum", {}).get("BLOCK_D", block_d)
    with _device_guard(grad):
        _kernels().patch_embed_bwd_colsum_kernel[(num_tokens, _cdiv(embed_dim, block_d))](
            grad, sums, batch, embed_dim, *grad.stride(), BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4
        )
    return sums


# ------------------------------------------------------------------------------------------------
# Custom ops. The forward takes an optional per-channel affine (norm_scale, norm_shift) applied to uint8
# images; the backward is three ops so that each gradient is computed only when it is needed.


@torch.library.custom_op(
    "fastvit::patch_embed_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, float[]? norm_scale, "
    "float[]? norm_shift) -> Tensor",
)
def _patch_embed_fwd(x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift):
    return _forward(x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift)


@_patch_embed_fwd.register_fake
def _(x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift):
    num_prefix = 0 if cls_token is None else cls_token.shape[1]
    num_patches = (x.shape[2] // weight.shape[2]) * (x.shape[3] // weight.shape[3])
    return weight.new_empty(
        (x.shape[0], num_prefix + num_patches, weight.shape[0]), dtype=_out_dtype(weight, pos_embed)
    )


@torch.library.custom_op(
    "fastvit::patch_embed_bwd_input", mutates_args=(), schema="(Tensor grad, Tensor x, Tensor weight) -> Tensor"
)
def _patch_embed_bwd_input(grad, x, weight):
    return _backward_input(grad, x, weight)


@_patch_embed_bwd_input.register_fake
def _(grad, x, weight):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_dx_memory_format(x))


@torch.library.custom_op(
    "fastvit::patch_embed_bwd_weight",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor weight, float[]? norm_scale, float[]? norm_shift) -> Tensor",
)
def _patch_embed_bwd_weight(grad, x, weight, norm_scale, norm_shift):
    return _backward_weight(grad, x, weight, norm_scale, norm_shift)


@_patch_embed_bwd_weight.register_fake
def _(grad, x, weight, norm_scale, norm_shift):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


@torch.library.custom_op("fastvit::patch_embed_bwd_colsum", mutates_args=(), schema="(Tensor grad) -> Tensor")
def _patch_embed_bwd_colsum(grad):
    return _backward_colsum(grad)


@_patch_embed_bwd_colsum.register_fake
def _(grad):
    return grad.new_empty(grad.shape[1:], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift = inputs
    ctx.save_for_backward(x, weight)
    ctx.norm = (norm_scale, norm_shift)
    ctx.num_prefix = 0 if cls_token is None else cls_token.shape[1]
    ctx.pos_covers_prefix = pos_embed is not None and pos_embed.shape[1] == output.shape[1]
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, pos_embed, cls_token))


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_bias, need_pos, need_cls = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_bias = grad_pos = grad_cls = None
    if need_x:
        grad_x = torch.ops.fastvit.patch_embed_bwd_input(grad, x, weight)
    if need_w:
        grad_w = torch.ops.fastvit.patch_embed_bwd_weight(grad, x, weight, *ctx.norm)
    if need_bias or need_pos or need_cls:
        sums = torch.ops.fastvit.patch_embed_bwd_colsum(grad)  # [T+N, D] fp32
        num_prefix = ctx.num_prefix
        bias_dtype, pos_dtype, cls_dtype = ctx.dtypes
        if need_bias:
            grad_bias = sums[num_prefix:].sum(0).to(bias_dtype)
        if need_pos:
            grad_pos = (sums if ctx.pos_covers_prefix else sums[num_prefix:]).unsqueeze(0).to(pos_dtype)
        if need_cls:
            grad_cls = sums[:num_prefix].unsqueeze(0).to(cls_dtype)
    return grad_x, grad_w, grad_bias, grad_pos, grad_cls, None, None


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)
