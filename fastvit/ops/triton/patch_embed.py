"""The Triton backend of ``patch_embed`` and ``patch_embed_uint8``: coverage, launchers, custom ops, autograd.

The kernels are ``fastvit/kernels/patch_embed.py``. Forward: one launch computes the implicit-im2col GEMM
(patches gathered by strides, NCHW, channels_last or any view, never copied), the bias, the position
embedding and the prefix rows, straight into the [B, T+N, D] buffer; float16, bfloat16 and float32 (fp32
accumulation; fp32 GEMMs follow ``launch.input_precision``). Backward: dX (when the image needs a gradient),
dW (split over the B·N patch rows: a fixed-order sum of fp32 partials in deterministic mode, fp32 atomics
otherwise), and dbias / dpos_embed / dcls_token from one batch column-sum of dY (fixed order, no atomics, in
both modes). The uint8 path normalises ``images · (1 / (255·std)) + (-mean / std)`` per pixel in fp32 while
gathering patches.

Registered as ``torch.library`` custom ops (``fastvit::patch_embed_fwd``, ``fastvit::patch_embed_bwd_input``,
``fastvit::patch_embed_bwd_weight``, ``fastvit::patch_embed_bwd_colsum``) with fake impls and autograd, so
``torch.compile(fullgraph=True)`` keeps them as opaque nodes; the launches allocate with ``torch.empty``/
``torch.zeros`` only and never synchronise with the host (CUDA-graph capturable after one warm-up call). Under
``torch.autocast`` the GEMM runs in the autocast dtype: the weight is cast (as autocast casts a conv's),
the image is not copied (its tiles are converted in the kernel), and the output dtype is the reference's under
autocast (the autocast dtype, promoted with ``pos_embed``'s dtype when there is one).
"""

from __future__ import annotations

import torch

from fastvit import dispatch
from fastvit.ops.autograd import no_double_backward
from fastvit.ops.patch_embed import PatchEmbedCall
from fastvit.ops.triton import launch
from fastvit.ops.triton.patch_embed_configs import (  # noqa: F401  (the overrides, candidates: tests and selftest)
    CONFIG_KINDS,
    CONFIG_OVERRIDES,
    GEMM_DTYPE_CODES,
    candidate_configs,
    channels_inner,
    forced_configs,
    heuristic_config,
    is_narrow_gather,
    tile_config,
)
from fastvit.validation import autocast_dtype, check_same_dtype

MAX_UINT8_CHANNELS = 4  # the uint8 path takes mean/std as 4 scalar kernel arguments


def supports(call: PatchEmbedCall) -> str | None:
    """Why the Triton kernels do not cover ``call`` (None: they do)."""
    compute = call.dtypes if call.autocast_dtype is None else (call.autocast_dtype,)
    why = dispatch.kernel_dtype_reason("triton", call.device, (*call.dtypes, *compute))
    if why is not None:
        return why
    if len(call.dtypes) > 1 and call.autocast_dtype is None:
        return f"mixed dtypes {[str(d).removeprefix('torch.') for d in call.dtypes]} outside autocast"
    if call.uint8 and call.in_chans > MAX_UINT8_CHANNELS:
        return f"the uint8 path takes at most {MAX_UINT8_CHANNELS} channels, got {call.in_chans}"
    return None


def _weight_for_autocast(weight: torch.Tensor) -> torch.Tensor:
    amp_dtype = autocast_dtype(weight.device)
    return weight if amp_dtype is None else weight.to(amp_dtype)  # as autocast casts a conv weight


@dispatch.register("patch_embed", "triton", supports=supports)
def patch_embed(x, weight, bias, pos_embed, cls_token):
    if autocast_dtype(x.device) is None:
        check_same_dtype(x=x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    # x is converted tile by tile in the kernel: no cast copy of the image
    return torch.ops.fastvit.patch_embed_fwd(x, _weight_for_autocast(weight), bias, pos_embed, cls_token, None, None)


@dispatch.register("patch_embed_uint8", "triton", supports=supports)
def patch_embed_uint8(x, weight, bias, pos_embed, cls_token, mean, std):
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    weight = _weight_for_autocast(weight)
    return torch.ops.fastvit.patch_embed_fwd(x, weight, bias, pos_embed, cls_token, scale, shift)


# ------------------------------------------------------------------------------------------------
# Launchers. Tile sizes: ``fastvit/ops/triton/patch_embed_configs.py``.


def _kernels():
    return launch.kernels("patch_embed")


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
    out = launch.new_output((g["B"], g["L"], g["D"]), _out_dtype(weight, pos_embed), x.device)
    num_rows = g["B"] * g["L"]
    if out.numel() == 0:
        return out
    cfg = tile_config("fwd", x, weight.dtype, num_rows, g["D"], g["K"], is_narrow_gather(x, g["PW"]))
    dummy = weight  # stands in for absent tensors (their HAS_* flag is off: never read)
    pos_offset = 0 if pos_embed is None or pos_embed.shape[1] == g["L"] else g["T"]
    grid = (launch.cdiv(num_rows, cfg["BLOCK_R"]) * launch.cdiv(g["D"], cfg["BLOCK_C"]),)
    with launch.device_guard(x):
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
            IN_CHANS=g["C"], PATCH_H=g["PH"], PATCH_W=g["PW"], CHANNELS_INNER=channels_inner(x),
            NORMALIZE=norm_scale is not None, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
            HAS_PREFIX=g["T"] > 0, INPUT_PRECISION=launch.input_precision(weight.dtype),
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
    dx = launch.new_output(tuple(x.shape), x.dtype, x.device, _dx_memory_format(x))
    num_rows = g["B"] * g["N"]
    if dx.numel() == 0:
        return dx
    cfg = tile_config("bwd_input", x, weight.dtype, num_rows, g["K"], g["D"], is_narrow_gather(dx, g["PW"]))
    grid = (launch.cdiv(num_rows, cfg["BLOCK_R"]) * launch.cdiv(g["K"], cfg["BLOCK_C"]),)
    with launch.device_guard(x):
        _kernels().patch_embed_bwd_input_kernel[grid](
            grad, weight, dx,
            num_rows, g["T"], g["N"], g["D"], g["K"], g["GW"],
            *grad.stride(), *weight.stride(), *dx.stride(),
            IN_CHANS=g["C"], PATCH_H=g["PH"], PATCH_W=g["PW"], CHANNELS_INNER=channels_inner(dx),
            INPUT_PRECISION=launch.input_precision(weight.dtype),
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
    if launch.on_gpu(x):
        cfg = dict(BLOCK_D=64, BLOCK_K=64, BLOCK_M=64 if weight.dtype != torch.float32 else 32, num_stages=3)
        cfg.update(num_warps=8 if is_narrow_gather(x, g["PW"]) else 4)  # 4 warps spill on sm_80
    else:
        cfg = dict(
            BLOCK_D=launch.next_pow2(g["D"], 16, 64),
            BLOCK_K=launch.next_pow2(g["K"], 16, 64),
            BLOCK_M=launch.next_pow2(num_rows, 16, 64),
        )
        cfg.update(num_warps=4, num_stages=1)
    cfg.update(CONFIG_OVERRIDES.get("bwd_weight", {}))
    block_d, block_k, block_m = cfg["BLOCK_D"], cfg["BLOCK_K"], cfg["BLOCK_M"]
    tiles = launch.cdiv(g["D"], block_d) * launch.cdiv(g["K"], block_k)
    row_blocks = launch.cdiv(num_rows, block_m)
    split = (
        max(1, min(launch.cdiv(2 * launch.num_sms(x.device.index), tiles), row_blocks // 8, 16))
        if launch.on_gpu(x)
        else 1
    )
    split = cfg.get("split", split)
    rows_per_split = launch.cdiv(row_blocks, split) * block_m
    split = launch.cdiv(num_rows, rows_per_split)  # no empty splits
    atomic = split > 1 and not dispatch.deterministic_enabled()
    if split == 1:
        work = launch.new_output(shape, weight.dtype, weight.device)
    elif atomic:
        work = torch.zeros(shape, dtype=torch.float32, device=weight.device)
    else:
        work = launch.new_output((split, *shape), torch.float32, weight.device)
    with launch.device_guard(x):
        _kernels().patch_embed_bwd_weight_kernel[(tiles, split)](
            grad, x, work,
            num_rows, rows_per_split, g["T"], g["N"], g["D"], g["K"], g["GW"],
            *grad.stride(), *x.stride(), *_norm_args(norm_scale, norm_shift),
            IN_CHANS=g["C"], PATCH_H=g["PH"], PATCH_W=g["PW"], CHANNELS_INNER=channels_inner(x),
            NORMALIZE=norm_scale is not None, ATOMIC=atomic, GEMM_DTYPE=GEMM_DTYPE_CODES[weight.dtype],
            INPUT_PRECISION=launch.input_precision(weight.dtype),
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
    sums = launch.new_output((num_tokens, embed_dim), torch.float32, grad.device)
    if sums.numel() == 0:
        return sums
    if batch == 0:
        return sums.zero_()
    block_d = launch.next_pow2(embed_dim, 16, 128)
    block_b = launch.next_pow2(batch, 1, 16)
    block_d = CONFIG_OVERRIDES.get("colsum", {}).get("BLOCK_D", block_d)
    with launch.device_guard(grad):
        _kernels().patch_embed_bwd_colsum_kernel[(num_tokens, launch.cdiv(embed_dim, block_d))](
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


@no_double_backward("patch_embed")
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
