"""The Triton backend of ``patch_embed`` and ``patch_embed_uint8``: coverage, launchers, custom ops, autograd.

The kernels are ``fastvit/kernels/patch_embed.py``. Forward: one launch computes the implicit-im2col GEMM
(patches gathered by strides, NCHW, channels_last or any view, never copied), the bias, the position
embedding and the prefix rows, straight into the [B, T+N, D] buffer; float16, bfloat16 and float32 (fp32
accumulation; fp32 GEMMs follow ``launch.input_precision``). Backward: dX (when the image needs a gradient),
dW (split over the B·N patch rows: a fixed-order sum of fp32 partials in deterministic mode, fp32 atomics
otherwise), and dbias / dpos_embed / dcls_token from one batch column-sum of dY (fixed order, no atomics, in
both modes). The uint8 path normalises ``images · (1 / (255·std)) + (-mean / std)`` per pixel in fp32 while
gathering patches.

With a norm of the patch tokens (LayerNorm / RMSNorm over D: AIMv2) the forward is ``patch_embed_norm_fwd_kernel``:
each program owns a block of rows and all of D, so the norm is an epilogue of the same launch. Its first pass stores
the pre-norm tokens z (rounded to the GEMM dtype, as the eager conv's output) and sums the fp32 row statistics; the
second reloads them, normalises, adds the position embedding and stores the tokens. z has to be written somewhere for
the second pass: in inference it lives in the output rows themselves (overwritten by the second pass), in training in
a [B, N, D] buffer that is saved with the per-row mean/rstd for the backward. Saving z thus costs memory (what
eager's norm saves: the conv output) but no extra traffic; recomputing it would run the projection GEMM again in the
backward. Backward: dpos / dcls from the column sum of dY as without a norm; the norm's backward (dz, and the norm
weight / bias gradients as fixed-order sums of per-row-block partials: ``kernels/linear.py``'s ``norm_bwd_kernel``,
the ``ln_linear`` prologue's) on the patch rows of dY; then the dX / dW / column-sum kernels on dz for the image,
the projection weight and its bias.

Registered as ``torch.library`` custom ops (``fastvit::patch_embed_fwd``, ``fastvit::patch_embed_norm_fwd``,
``fastvit::patch_embed_bwd_input``, ``fastvit::patch_embed_bwd_weight``, ``fastvit::patch_embed_bwd_colsum``,
``fastvit::patch_embed_norm_bwd``) with fake impls and autograd, so
``torch.compile(fullgraph=True)`` keeps them as opaque nodes; the launches allocate with ``torch.empty``/
``torch.zeros`` only and never synchronise with the host (CUDA-graph capturable after one warm-up call). Under
``torch.autocast`` the GEMM runs in the autocast dtype: the weight is cast (as autocast casts a conv's),
the image is not copied (its tiles are converted in the kernel), and the output dtype is the reference's under
autocast (the autocast dtype, promoted with ``pos_embed``'s dtype when there is one, and with the norm weight's:
autocast runs norms in fp32).
"""

from __future__ import annotations

import torch

from fastvit import dispatch
from fastvit.ops.autograd import no_double_backward
from fastvit.ops.patch_embed import EmbedNorm, PatchEmbedCall
from fastvit.ops.triton import launch
from fastvit.ops.triton.linear_launch import NORM_CODES, norm_backward
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
def patch_embed(x, weight, bias, pos_embed, cls_token, norm: EmbedNorm | None = None):
    if autocast_dtype(x.device) is None:
        check_same_dtype(
            x=x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token,
            norm_weight=None if norm is None else norm.weight, norm_bias=None if norm is None else norm.bias,
        )  # fmt: skip
    # x is converted tile by tile in the kernel: no cast copy of the image
    return _project(x, _weight_for_autocast(weight), bias, pos_embed, cls_token, None, None, norm)


@dispatch.register("patch_embed_uint8", "triton", supports=supports)
def patch_embed_uint8(x, weight, bias, pos_embed, cls_token, mean, std, norm: EmbedNorm | None = None):
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    return _project(x, _weight_for_autocast(weight), bias, pos_embed, cls_token, scale, shift, norm)


def _project(x, weight, bias, pos_embed, cls_token, scale, shift, norm: EmbedNorm | None):
    """The forward custom op: without a norm ``patch_embed_fwd``, else ``patch_embed_norm_fwd`` (saving z and the row
    statistics when a gradient will be asked for)."""
    if norm is None:
        return torch.ops.fastvit.patch_embed_fwd(x, weight, bias, pos_embed, cls_token, scale, shift)
    # z and the row statistics serve the gradients through the norm; pos_embed's and the prefix tokens' need neither
    through_norm = (x, weight, bias, norm.weight, norm.bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in through_norm)
    out, *_saved = torch.ops.fastvit.patch_embed_norm_fwd(
        x, weight, bias, pos_embed, cls_token, scale, shift, norm.weight, norm.bias, norm.eps, NORM_CODES[norm.kind],
        save,
    )  # fmt: skip
    return out


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


def _out_dtype(weight: torch.Tensor, *others: torch.Tensor | None) -> torch.dtype:
    """The reference's output dtype: the GEMM's (weight's), promoted with pos_embed's and the norm weight's (matters
    under autocast)."""
    dtype = weight.dtype
    for other in others:
        dtype = dtype if other is None else torch.promote_types(dtype, other.dtype)
    return dtype


def _token_geometry(x: torch.Tensor, weight: torch.Tensor, cls_token: torch.Tensor | None) -> dict:
    num_prefix = 0 if cls_token is None else cls_token.shape[1]
    num_patches = (x.shape[2] // weight.shape[2]) * (x.shape[3] // weight.shape[3])
    return _geometry(x, weight, num_prefix + num_patches)


def _fwd_launch_args(g, x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift) -> dict:
    """The arguments both forward kernels take: the input tensors (``weight`` stands in for absent ones: their HAS_*
    flag is off, never read), the sizes, the strides, the uint8 affine and the constexpr flags."""
    pos_offset = 0 if pos_embed is None or pos_embed.shape[1] == g["L"] else g["T"]
    return dict(
        inputs=(x, weight, *(weight if t is None else t for t in (bias, pos_embed, cls_token))),
        sizes=(g["B"] * g["L"], g["T"], g["L"], g["D"], g["K"], g["GW"], pos_offset),
        strides=(
            *x.stride(),
            *weight.stride(),
            0 if bias is None else bias.stride(0),
            *((0, 0) if pos_embed is None else pos_embed.stride()[1:]),
            *((0, 0) if cls_token is None else cls_token.stride()[1:]),
        ),  # fmt: skip
        pixels=_norm_args(norm_scale, norm_shift),
        flags=dict(
            IN_CHANS=g["C"],
            PATCH_H=g["PH"],
            PATCH_W=g["PW"],
            CHANNELS_INNER=channels_inner(x),
            NORMALIZE=norm_scale is not None,
            HAS_BIAS=bias is not None,
            HAS_POS=pos_embed is not None,
            HAS_PREFIX=g["T"] > 0,
            INPUT_PRECISION=launch.input_precision(weight.dtype),
        ),  # fmt: skip
    )


def _tiles(kind: str, x, weight, g) -> tuple[dict, dict]:
    """(the forward kernel's tile config, its launch keywords)."""
    cfg = tile_config(kind, x, weight.dtype, g["B"] * g["L"], g["D"], g["K"], is_narrow_gather(x, g["PW"]))
    meta = dict(BLOCK_M=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_RED"])
    return cfg, dict(meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _forward(x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift) -> torch.Tensor:
    g = _token_geometry(x, weight, cls_token)
    out = launch.new_output((g["B"], g["L"], g["D"]), _out_dtype(weight, pos_embed), x.device)
    if out.numel() == 0:
        return out
    cfg, meta = _tiles("fwd", x, weight, g)
    a = _fwd_launch_args(g, x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift)
    grid = (launch.cdiv(g["B"] * g["L"], cfg["BLOCK_R"]) * launch.cdiv(g["D"], cfg["BLOCK_C"]),)
    with launch.device_guard(x):
        _kernels().patch_embed_fwd_kernel[grid](
            *a["inputs"], out, *a["sizes"], *a["strides"], *a["pixels"], **a["flags"], **meta
        )
    return out


def _forward_norm(x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift, norm_weight, norm_bias, eps, norm,
                  save):  # fmt: skip
    """(tokens [B, T+N, D], z [B, N, D] in the GEMM dtype, mean [B·N] fp32 (LayerNorm), rstd [B·N] fp32) of the
    normed patch embedding; z, mean and rstd are [0] when not ``save`` (and mean for RMSNorm)."""
    g = _token_geometry(x, weight, cls_token)
    out = launch.new_output((g["B"], g["L"], g["D"]), _out_dtype(weight, pos_embed, norm_weight), x.device)
    patch_rows = g["B"] * g["N"]
    z = launch.new_output((g["B"], g["N"], g["D"]) if save else (0,), weight.dtype, x.device)
    mean = launch.new_output((patch_rows,) if save and norm == NORM_CODES["layer"] else (0,), torch.float32, x.device)
    rstd = launch.new_output((patch_rows,) if save else (0,), torch.float32, x.device)
    if out.numel() == 0:
        return out, z, mean, rstd
    cfg, meta = _tiles("fwd_norm", x, weight, g)
    a = _fwd_launch_args(g, x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift)
    stats = (mean if mean.numel() else rstd, rstd) if save else (out, out)  # never written when absent
    with launch.device_guard(x):
        _kernels().patch_embed_norm_fwd_kernel[(launch.cdiv(g["B"] * g["L"], cfg["BLOCK_R"]),)](
            *a["inputs"], norm_weight, weight if norm_bias is None else norm_bias, out, z if save else out, *stats,
            *a["sizes"], eps, *a["strides"], norm_weight.stride(0), 0 if norm_bias is None else norm_bias.stride(0),
            *a["pixels"], **a["flags"], NORM=norm, HAS_NORM_BIAS=norm_bias is not None, SAVE=save, **meta,
        )  # fmt: skip
    return out, z, mean, rstd


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
    return weight.new_empty(_token_shape(x, weight, cls_token), dtype=_out_dtype(weight, pos_embed))


def _token_shape(x, weight, cls_token) -> tuple[int, int, int]:
    num_prefix = 0 if cls_token is None else cls_token.shape[1]
    num_patches = (x.shape[2] // weight.shape[2]) * (x.shape[3] // weight.shape[3])
    return (x.shape[0], num_prefix + num_patches, weight.shape[0])


@torch.library.custom_op(
    "fastvit::patch_embed_norm_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, float[]? norm_scale, "
    "float[]? norm_shift, Tensor norm_weight, Tensor? norm_bias, float eps, int norm, bool save) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _patch_embed_norm_fwd(x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift, norm_weight, norm_bias, eps,
                          norm, save):  # fmt: skip
    return _forward_norm(
        x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift, norm_weight, norm_bias, eps, norm, save
    )


@_patch_embed_norm_fwd.register_fake
def _(x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift, norm_weight, norm_bias, eps, norm, save):
    batch, tokens, dim = _token_shape(x, weight, cls_token)
    num_patches = (x.shape[2] // weight.shape[2]) * (x.shape[3] // weight.shape[3])
    patch_rows = batch * num_patches
    return (
        weight.new_empty((batch, tokens, dim), dtype=_out_dtype(weight, pos_embed, norm_weight)),
        weight.new_empty((batch, num_patches, dim) if save else (0,)),
        weight.new_empty((patch_rows,) if save and norm == NORM_CODES["layer"] else (0,), dtype=torch.float32),
        weight.new_empty((patch_rows,) if save else (0,), dtype=torch.float32),
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


@torch.library.custom_op(
    "fastvit::patch_embed_norm_bwd",
    mutates_args=(),
    schema="(Tensor grad, Tensor z, Tensor mean, Tensor rstd, Tensor norm_weight, int norm, bool has_norm_bias) "
    "-> (Tensor, Tensor, Tensor)",
)
def _patch_embed_norm_bwd(grad, z, mean, rstd, norm_weight, norm, has_norm_bias):
    """(dz [B, N, D] in z's dtype, d norm weight [D], d norm bias [D] or [0]) from the tokens' gradient dY [B, T+N, D]
    (its patch rows), the saved pre-norm tokens z [B, N, D] and row statistics."""
    batch, num_patches, dim = z.shape
    if z.numel() == 0:
        empty_bias = torch.zeros_like(norm_weight) if has_norm_bias else norm_weight.new_empty(0)
        return torch.zeros_like(z), torch.zeros_like(norm_weight), empty_bias
    grad_normed = grad[:, grad.shape[1] - num_patches :]  # read in place: one batch stride, one row stride
    with launch.device_guard(z):
        grad_z, grad_weight, grad_bias = norm_backward(
            grad_normed, z.view(batch * num_patches, dim), norm_weight, mean, rstd, norm, has_norm_bias
        )
    return grad_z.view(batch, num_patches, dim), grad_weight, grad_bias


@_patch_embed_norm_bwd.register_fake
def _(grad, z, mean, rstd, norm_weight, norm, has_norm_bias):
    return (
        torch.empty_like(z, memory_format=torch.contiguous_format),
        torch.empty_like(norm_weight),
        norm_weight.new_empty(norm_weight.shape if has_norm_bias else (0,)),
    )


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
    return (*_gradients(ctx, grad, x, weight, ctx.needs_input_grad[:5], ctx.num_prefix), None, None)


def _gradients(ctx, grad, x, weight, needed, num_prefix) -> tuple:
    """(dx, dW, dbias, dpos, dcls), each None unless ``needed``, from dY [B, num_prefix + N, D]: the tokens' gradient
    without a norm; with one, the tokens' gradient for dpos / dcls and dz (num_prefix 0) for the others."""
    need_x, need_w, need_bias, need_pos, need_cls = needed
    grad_x = grad_w = grad_bias = grad_pos = grad_cls = None
    if need_x:
        grad_x = torch.ops.fastvit.patch_embed_bwd_input(grad, x, weight)
    if need_w:
        grad_w = torch.ops.fastvit.patch_embed_bwd_weight(grad, x, weight, *ctx.norm)
    if need_bias or need_pos or need_cls:
        sums = torch.ops.fastvit.patch_embed_bwd_colsum(grad)  # [T+N, D] fp32
        bias_dtype, pos_dtype, cls_dtype = ctx.dtypes
        if need_bias:
            grad_bias = sums[num_prefix:].sum(0).to(bias_dtype)
        if need_pos:
            grad_pos = (sums if ctx.pos_covers_prefix else sums[num_prefix:]).unsqueeze(0).to(pos_dtype)
        if need_cls:
            grad_cls = sums[:num_prefix].unsqueeze(0).to(cls_dtype)
    return grad_x, grad_w, grad_bias, grad_pos, grad_cls


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


def _setup_norm_context(ctx, inputs, output):
    x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift, norm_weight, norm_bias, _eps, norm, _save = inputs
    _setup_context(ctx, (x, weight, bias, pos_embed, cls_token, norm_scale, norm_shift), output[0])
    _out, z, mean, rstd = output
    ctx.save_for_backward(x, weight, norm_weight, z, mean, rstd)
    ctx.norm_kind, ctx.has_norm_bias = norm, norm_bias is not None


@no_double_backward("patch_embed")
def _norm_backward(ctx, grad, _grad_z, _grad_mean, _grad_rstd):
    x, weight, norm_weight, z, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_bias, need_pos, need_cls = ctx.needs_input_grad[:5]
    need_norm_weight, need_norm_bias = ctx.needs_input_grad[7:9]
    grads = list(_gradients(ctx, grad, x, weight, (False, False, False, need_pos, need_cls), ctx.num_prefix))
    grad_norm_weight = grad_norm_bias = None
    if need_x or need_w or need_bias or need_norm_weight or need_norm_bias:
        if z.numel() == 0 and grad.numel() != 0:
            raise RuntimeError(
                "patch_embed: the forward ran without saving the pre-norm tokens (no input through the norm required "
                "grad then); run it again with requires_grad set before calling backward"
            )
        grad_z, grad_norm_weight, grad_norm_bias = torch.ops.fastvit.patch_embed_norm_bwd(
            grad, z, mean, rstd, norm_weight, ctx.norm_kind, ctx.has_norm_bias
        )
        projection = _gradients(ctx, grad_z, x, weight, (need_x, need_w, need_bias, False, False), 0)
        grads[:3] = projection[:3]
    return (
        *grads, None, None,
        grad_norm_weight if need_norm_weight else None,
        grad_norm_bias if need_norm_bias else None,
        None, None, None,
    )  # fmt: skip


_patch_embed_norm_fwd.register_autograd(_norm_backward, setup_context=_setup_norm_context)
