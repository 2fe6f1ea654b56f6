"""The Triton backend of ``ln_linear`` and ``ln_mlp``: fused-GEMM launchers, custom ops and autograd.

The kernels are ``fastvit/kernels/linear.py`` (a tiled GEMM with a LayerNorm prologue and bias / GELU / residual
epilogues); this file is the host side: coverage, autocast, allocation, grids, configs and autotuning, then the
``torch.library`` custom ops ``fastvit::ln_linear_fwd/bwd`` with fake impls and autograd.

Forward: row statistics (``ln_stats_kernel``, fp32 mean/rstd, M·8 bytes) when there is a LayerNorm, then one GEMM.
Training saves x, the statistics and, with an activation, the pre-activation z = LN(x) Wᵀ + b (the activation's
derivative needs it; recomputing it would cost a second forward GEMM, 2·M·N·K FLOPs, against M·N elements
written once and read twice; the ``cuda`` backend of ``ln_mlp`` saves it too). Neither LN(x) nor act(z) is saved.
Backward: dÂ = (dout·act'(z)) W and dW = (dout·act'(z))ᵀ LN(x), db = Σ dout·act'(z), the derivative applied to each
output-gradient tile as it is loaded and LN(x) re-applied to each x tile, then LayerNorm's backward (dx, dgamma,
dbeta from dÂ) by the extension's ``fastvit::layer_norm_bwd`` (so a LayerNorm prologue needs the extension for
training). No atomics: gradients are bit-identical run to run; in deterministic mode the configs are fixed too.

``ln_mlp`` on this backend is two of these GEMMs: fc1 with the LayerNorm prologue and GELU epilogue, fc2 with the
bias and residual epilogue; the only intermediates in memory are the statistics and the hidden activations.

``auto`` picks these kernels only where ``fastvit/gemm_choices.json`` says they won the benchmark (see
``fastvit.gemm_choices``); an explicit ``backend='triton'`` always runs them.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from fastvit import dispatch, gemm_choices
from fastvit.ops.autograd import no_double_backward
from fastvit.ops.ln_linear import GemmCall
from fastvit.ops.triton import launch
from fastvit.validation import cast_like_autocast_linear, centred_in_dtype

ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}  # kernels/linear.py's ACT_* constants
_MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")  # the ln_mlp activations the GEMM epilogue computes


def supports(call) -> str | None:
    """Why the Triton GEMMs do not cover ``call`` (None: they do)."""
    reason = dispatch.kernel_dtype_reason("triton", call.device, (call.dtype,))
    if reason is None and getattr(call, "layer_norm", True) and not dispatch.extension_available():
        reason = "the LayerNorm prologue's backward is the extension's layer_norm_bwd, and fastvit._C is not available"
    return reason


def measured_choice(op_name: str):
    """The ``measured`` predicate of ``op_name`` (see ``dispatch.Implementation``): ``auto`` leaves the call to
    cuBLAS(Lt) unless the choice table says Triton won. Device-level calls carry no shape: only ``'*'`` entries."""

    def measured(call) -> str | None:
        if call.device.type != "cuda":
            return None
        bucket = None
        if isinstance(call, GemmCall) or hasattr(call, "in_features"):  # GemmCall, or ln_mlp's MlpCall
            bucket = gemm_choices.shape_bucket(call.in_features, call.out_features)
        if gemm_choices.preferred(op_name, bucket, call.dtype, call.device) == "triton":
            return None
        return (
            f"no benchmark evidence that the Triton GEMMs beat cuBLAS(Lt) for {op_name} at {bucket or 'this shape'}, "
            f"{'any dtype' if call.dtype is None else str(call.dtype).removeprefix('torch.')} on this GPU "
            "(fastvit/gemm_choices.json)"
        )

    return measured


@dispatch.register("ln_linear", "triton", supports=supports, measured=measured_choice("ln_linear"))
def ln_linear(x, ln_weight, ln_bias, weight, bias, eps, activation, residual):
    residual_outside = None
    cast_x, ln_weight, ln_bias, weight, bias = cast_like_autocast_linear(
        x.device.type, x, ln_weight, ln_bias, weight, bias
    )
    if ln_weight is not None and cast_x.element_size() < x.element_size():
        cast_x = centred_in_dtype(x, cast_x.dtype)  # see centred_in_dtype: LayerNorm is shift invariant
    x = cast_x
    if residual is not None and residual.dtype != x.dtype:  # under autocast: added as eager does (type promotion)
        residual_outside, residual = residual, None
    in_features, out_features = weight.shape[1], weight.shape[0]
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, ln_weight, ln_bias, weight, bias, residual)
    )
    out = torch.ops.fastvit.ln_linear_fwd(
        x.reshape(-1, in_features),
        ln_weight,
        ln_bias,
        weight,
        bias,
        None if residual is None else residual.reshape(-1, out_features),
        eps,
        ACTIVATION_CODES[activation],
        save and activation != "none",
    )[0].view(*x.shape[:-1], out_features)
    return out if residual_outside is None else residual_outside + out


def mlp_supports(call) -> str | None:
    """Why the two Triton GEMMs do not cover ``ln_mlp``'s ``call`` (its variant: LayerNorm and GELU only)."""
    if getattr(call, "act", "gelu") not in _MLP_ACTIVATIONS:
        return f"act={call.act!r}: the Triton GEMM epilogues compute GELU, GELU-tanh and QuickGELU only"
    if getattr(call, "norm", "layer") != "layer":
        return f"norm={call.norm!r}: the Triton GEMM prologue is a LayerNorm"
    if getattr(call, "hidden_norm", False):
        return "a norm over the hidden layer is not in the Triton GEMMs"
    return supports(call)


@dispatch.register("ln_mlp", "triton", supports=mlp_supports, measured=measured_choice("ln_mlp"))
def ln_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, norm, hidden_norm):
    """fc1 with the LayerNorm prologue and GELU epilogue, then fc2 with the bias and residual epilogue."""
    if act not in _MLP_ACTIVATIONS or norm != "layer" or hidden_norm is not None:
        raise ValueError(
            f"ln_mlp(backend='triton'): the Triton GEMMs run LayerNorm + GELU/QuickGELU MLPs only, got "
            f"act={act!r}, norm={norm!r}"
        )
    if ln_bias is None:  # the prologue takes both LayerNorm parameters: a zero bias is the bias-free LayerNorm
        ln_bias = torch.zeros_like(ln_weight)
    hidden = ln_linear(x, ln_weight, ln_bias, fc1_weight, fc1_bias, eps, act, None)
    return ln_linear(hidden, None, None, fc2_weight, fc2_bias, eps, "none", x if residual else None)


# ------------------------------------------------------------------------------------------------
# Configs and launches


def candidate_configs(kind: str, arch: int, elem_bytes: int) -> list[tuple[int, int, int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) configs autotuning may pick for one kernel kind
    ('fwd' | 'input' | 'weight') on GPU generation ``arch`` (80 or 90) for operands of ``elem_bytes``."""
    table = launch.kernels("linear").CONFIGS[kind]
    return list(table["fp32"] if elem_bytes == 4 else table[arch])


def _triton_config(entry):
    import triton

    block_m, block_n, block_k, group_m, warps, stages = entry
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


_KERNELS = {"fwd": "linear_fwd_kernel", "input": "linear_bwd_input_kernel", "weight": "linear_bwd_weight_kernel"}
KINDS = tuple(_KERNELS)
_FORCED_CONFIGS: dict[str, tuple[int, ...]] = {}  # kernel kind -> config every launch must use


@contextlib.contextmanager
def forced_configs(configs: dict[str, tuple[int, ...]]):
    """Within the block, launch each kernel kind named in ``configs`` ('fwd' | 'input' | 'weight') with the given
    (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) instead of the autotuner's, deterministic or interpreter's.

    How ``fastvit selftest`` runs every config of :func:`candidate_configs` on a GPU, and how the tests run small
    tiles (several K steps, several programs) on small shapes. Not thread-safe (process-wide).
    """
    fields = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "warps", "stages")
    with launch.forced_configs(_FORCED_CONFIGS, _KERNELS, configs, fields):
        for kind, entry in configs.items():
            if any(block < 16 or block & (block - 1) for block in entry[:3]):
                raise ValueError(f"configs[{kind!r}]: block sizes must be powers of two >= 16 (tl.dot), got {entry!r}")
        yield


@functools.cache
def _autotuned(kind: str, arch: int, elem_bytes: int, rows_bucket: int):
    """The autotuned kernel of ``kind`` for one GPU generation, operand width and bucket of M (next power of two):
    the best tiles depend on how many output tiles fill the GPU, so a config tuned at batch 1 is not reused at 256."""
    import triton

    kernel = getattr(launch.kernels("linear"), _KERNELS[kind])
    configs = [_triton_config(e) for e in candidate_configs(kind, arch, elem_bytes)]
    # Tensor dtypes join the key automatically (Triton appends every tensor argument's dtype).
    return triton.autotune(configs=configs, key=["N", "K", "ACTIVATION", "INPUT_PRECISION"])(kernel)


def _launch(kind: str, like: torch.Tensor, rows: int, num_programs, args: tuple, constants: dict) -> None:
    """Run kernel ``kind`` on a 1-D grid of ``num_programs(BLOCK_M, BLOCK_N, BLOCK_K)`` programs: a config forced by
    :func:`forced_configs`, else the interpreter's fixed config, else the first table config in deterministic mode
    (no timing: every process picks the same tiles), else autotuned per bucket of ``rows``."""
    kernels = launch.kernels("linear")
    grid = lambda meta: (num_programs(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]),)
    if kind in _FORCED_CONFIGS:
        entry = _FORCED_CONFIGS[kind]
    elif not launch.on_gpu(like):
        entry = kernels.INTERPRETER_CONFIG
    elif dispatch.deterministic_enabled():
        entry = candidate_configs(kind, launch.gpu_arch(like), like.element_size())[0]
    else:
        bucket = launch.next_pow2(rows, 1, 1 << 40)
        _autotuned(kind, launch.gpu_arch(like), like.element_size(), bucket)[grid](*args, **constants)
        return
    config = _triton_config(entry)
    meta = config.kwargs
    getattr(kernels, _KERNELS[kind])[grid(meta)](
        *args, **constants, **meta, num_warps=config.num_warps, num_stages=config.num_stages
    )


def _row_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (mean, rstd) [M] of the rows of x [M, K]."""
    kernels = launch.kernels("linear")
    rows, width = x.shape
    mean = launch.new_output((rows,), torch.float32, x.device)
    rstd = launch.new_output((rows,), torch.float32, x.device)
    if rows:
        grid = (launch.cdiv(rows, kernels.STATS_BLOCK_M),)
        kernels.ln_stats_kernel[grid](
            x, mean, rstd, rows, width, *x.stride(), eps, BLOCK_M=kernels.STATS_BLOCK_M, BLOCK_K=kernels.STATS_BLOCK_K
        )
    return mean, rstd


def _forward(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act):
    """out [M, N] = act(LN(x) Wᵀ + b) + residual, and (mean, rstd, pre_act) for the backward (empty when unused)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    out = launch.new_output((rows, out_features), x.dtype, x.device)
    pre_act = launch.new_output((rows, out_features) if save_pre_act else (0,), x.dtype, x.device)
    has_ln = ln_weight is not None
    ln_weight, ln_bias, bias = (None if t is None else t.contiguous() for t in (ln_weight, ln_bias, bias))  # [K], [N]
    with launch.device_guard(x):
        if has_ln:
            mean, rstd = _row_stats(x, eps)
        else:  # two tensors: a custom op's outputs must not alias one another
            mean, rstd = (x.new_empty(0, dtype=torch.float32) for _ in range(2))
        if out.numel() == 0:
            return out, mean, rstd, pre_act
        absent = out  # any tensor: a pointer the kernel never reads (its constexpr flag is off)
        residual_strides = residual.stride() if residual is not None else (0, 0)
        args = (
            x, weight, absent if bias is None else bias, absent if residual is None else residual, out,
            pre_act if save_pre_act else absent, mean if has_ln else absent, rstd if has_ln else absent,
            ln_weight if has_ln else absent, ln_bias if has_ln else absent,
            rows, out_features, in_features, *x.stride(), *weight.stride(), *residual_strides,
        )  # fmt: skip
        constants = dict(
            HAS_LN=has_ln, HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_RESIDUAL=residual is not None,
            SAVE_PRE_ACT=save_pre_act, INPUT_PRECISION=launch.input_precision(x.dtype),
        )  # fmt: skip
        num_programs = lambda bm, bn, bk: launch.cdiv(rows, bm) * launch.cdiv(out_features, bn)
        _launch("fwd", x, rows, num_programs, args, constants)
    return out, mean, rstd, pre_act


def _backward(grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias):
    """(dÂ [M, K] in x's dtype: the gradient of the GEMM's A operand, i.e. of LayerNorm's output with a prologue;
    dW [N, K]; db [N], or empty without a bias)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    grad_out = grad_out.contiguous()
    grad_a = launch.new_output((rows, in_features), x.dtype, x.device)
    grad_weight = launch.new_output(tuple(weight.shape), weight.dtype, weight.device)
    grad_bias = launch.new_output((out_features,) if has_bias else (0,), weight.dtype, weight.device)
    if rows == 0:  # sums over no rows
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_a, grad_weight, grad_bias
    has_ln = ln_weight is not None
    ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (ln_weight, ln_bias))  # the kernels read [K]
    z = pre_act if activation != ACTIVATION_CODES["none"] else grad_out  # never read without an activation
    precision = launch.input_precision(x.dtype)
    with launch.device_guard(x):
        args = (grad_out, z, weight, grad_a, rows, out_features, in_features, *weight.stride())
        num_programs = lambda bm, bn, bk: launch.cdiv(rows, bm) * launch.cdiv(in_features, bk)
        constants = dict(ACTIVATION=activation, INPUT_PRECISION=precision)
        _launch("input", x, rows, num_programs, args, constants)
        ln = (mean, rstd, ln_weight, ln_bias) if has_ln else (grad_a,) * 4  # never read without a LayerNorm
        bias_out = grad_bias if has_bias else grad_a
        args = (grad_out, z, x, *ln, grad_weight, bias_out, rows, out_features, in_features, *x.stride())
        num_programs = lambda bm, bn, bk: launch.cdiv(out_features, bn) * launch.cdiv(in_features, bk)
        constants = dict(HAS_LN=has_ln, HAS_BIAS=has_bias, ACTIVATION=activation, INPUT_PRECISION=precision)
        _launch("weight", x, rows, num_programs, args, constants)
    return grad_a, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------------
# Custom ops: fastvit::ln_linear_fwd returns (out, mean, rstd, pre_act), the last three saved for the backward
# (empty when there is no LayerNorm / no activation or no backward to come).

_FWD = (
    "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, Tensor? residual, float eps, "
    "int activation, bool save_pre_act) -> (Tensor, Tensor, Tensor, Tensor)"
)
_BWD = (
    "(Tensor grad_out, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor mean, Tensor rstd, Tensor weight, "
    "Tensor pre_act, int activation, bool has_bias) -> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("fastvit::ln_linear_fwd", mutates_args=(), schema=_FWD)
def _ln_linear_fwd(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act):
    return _forward(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act)


@_ln_linear_fwd.register_fake
def _(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act):
    rows, out_features = x.shape[0], weight.shape[0]
    stats = (rows,) if ln_weight is not None else (0,)
    return (
        x.new_empty((rows, out_features)),
        x.new_empty(stats, dtype=torch.float32),
        x.new_empty(stats, dtype=torch.float32),
        x.new_empty((rows, out_features) if save_pre_act else (0,)),
    )


@torch.library.custom_op("fastvit::ln_linear_bwd", mutates_args=(), schema=_BWD)
def _ln_linear_bwd(grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias):
    return _backward(grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias)


@_ln_linear_bwd.register_fake
def _(grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias):
    grad_bias = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, residual, _eps, activation, _save = inputs
    _out, mean, rstd, pre_act = output
    ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, weight, pre_act)
    ctx.activation, ctx.has_bias, ctx.has_residual = activation, bias is not None, residual is not None


@no_double_backward("ln_linear/ln_mlp")  # the GEMMs of both ops
def _ln_linear_backward(ctx, grad_out, _grad_mean, _grad_rstd, _grad_pre_act):
    x, ln_weight, ln_bias, mean, rstd, weight, pre_act = ctx.saved_tensors
    if ctx.activation != ACTIVATION_CODES["none"] and pre_act.numel() != grad_out.numel():
        raise RuntimeError(
            "ln_linear: the forward ran without saving the pre-activation (no input required grad then); "
            "run it again with requires_grad set before calling backward"
        )
    grad_a, grad_weight, grad_bias = torch.ops.fastvit.ln_linear_bwd(
        grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, ctx.activation, ctx.has_bias
    )
    grad_ln_weight = grad_ln_bias = None
    grad_x = grad_a
    if ln_weight is not None:
        grad_x, grad_ln_weight, grad_ln_bias = torch.ops.fastvit.layer_norm_bwd(grad_a, x, ln_weight, mean, rstd)
    return (
        grad_x,
        grad_ln_weight,
        grad_ln_bias,
        grad_weight,
        grad_bias if ctx.has_bias else None,
        grad_out if ctx.has_residual else None,
        None,
        None,
        None,
    )


_ln_linear_fwd.register_autograd(_ln_linear_backward, setup_context=_setup_context)
