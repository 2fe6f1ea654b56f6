"""The Triton backend of ``ln_linear`` and ``ln_mlp``: fused-GEMM launchers, custom ops and autograd.

The kernels are ``fastvit/kernels/linear.py`` (a tiled GEMM with a LayerNorm / RMSNorm prologue and bias /
activation / residual epilogues, its two backward GEMMs and the norm's backward); this file is the host side:
coverage, autocast and dispatch here, then the ``torch.library`` custom ops ``fastvit::ln_linear_fwd/bwd`` with fake
impls and autograd; allocation, grids, configs, split-K and autotuning are ``fastvit/ops/triton/linear_launch.py``.
Nothing here needs the compiled extension.

Forward: row statistics (``norm_stats_kernel``, fp32 mean and rstd, or rstd alone for RMSNorm) when there is a
norm, then one GEMM. Training saves x, the statistics and, with an activation, the pre-activation z = Norm(x) Wᵀ + b
([M, 2N] gate and value for SwiGLU). Stored, not recomputed: recomputing it would cost a second forward GEMM
(2·M·N·K FLOPs; 4·M·N·K for SwiGLU's two halves) against M·N (2·M·N) elements written once and read twice by the
two backward GEMMs; the ``cuda`` backend of ``ln_mlp`` saves it too. Neither Norm(x) nor act(z) is saved.
Backward: dÂ = dz W and dW = dzᵀ Norm(x), db = Σ dz with dz = dout·act'(z) (SwiGLU: d gate and d value side by
side, so dW is [2N, K] in the packed layout, cut in halves for timm's split layout), the derivative applied to each
output-gradient tile as it is loaded and Norm(x) re-applied to each x tile, then the norm's backward (dx, and the
weight / bias gradients as per-16-row partials summed here). When the dW tiles are too few to fill the GPU the M
reduction is split (:func:`weight_split_k`) into fp32 partials summed here in slice order. No atomics: gradients
are bit-identical run to run; in deterministic mode the configs are fixed too.

``ln_mlp`` on this backend is two of these GEMMs: fc1 with the norm prologue and the activation epilogue, fc2 with
the hidden-layer norm (sub-LN) as its prologue and the bias and residual epilogue; the only intermediates in memory
are the statistics and the hidden activations. Every variant of ``ops.ln_mlp`` runs here.

``auto`` picks these kernels only where ``fastvit/gemm_choices.json`` says they won the benchmark (see
``fastvit.gemm_choices``); an explicit ``backend='triton'`` always runs them.
"""

from __future__ import annotations

import torch

from fastvit import dispatch, gemm_choices
from fastvit.ops.autograd import no_double_backward
from fastvit.ops.ln_linear import GemmCall
from fastvit.ops.triton.linear_launch import (  # noqa: F401  (KINDS, TMA_KINDS, candidate_configs, forced_configs,
    # forced_split_k, weight_split_k, hopper_path, tma_forward_reason: selftest, tests, benchmarks)
    ACTIVATION_CODES,
    KINDS,
    NORM_CODES,
    TMA_KINDS,
    _backward,
    _forward,
    candidate_configs,
    forced_configs,
    forced_split_k,
    hopper_path,
    tma_forward_reason,
    weight_split_k,
)
from fastvit.validation import cast_like_autocast_linear, centred_in_dtype


def supports(call) -> str | None:
    """Why the Triton GEMMs do not cover ``call`` (None: they do). Every prologue, epilogue and backward is a
    Triton kernel (the norm's backward too): only the dtype rule remains."""
    return dispatch.kernel_dtype_reason("triton", call.device, (call.dtype,))


def measured_choice(op_name: str):
    """The ``measured`` predicate of ``op_name`` (see ``dispatch.Implementation``): ``auto`` leaves the call to
    cuBLAS(Lt) unless the choice table says Triton won. Device-level calls carry no shape: only ``'*'`` entries."""

    def measured(call) -> str | None:
        if call.device.type != "cuda":
            return None
        bucket, variant = None, gemm_choices.ANY_VARIANT
        if isinstance(call, GemmCall) or hasattr(call, "in_features"):  # GemmCall, or ln_mlp's MlpCall
            bucket = gemm_choices.shape_bucket(call.in_features, call.out_features)
        if hasattr(call, "act"):  # ln_mlp's MlpCall: its variant
            variant = gemm_choices.mlp_variant(call.norm, call.act, call.hidden_norm)
        if gemm_choices.preferred(op_name, bucket, call.dtype, call.device, variant) == "triton":
            return None
        at = f"{bucket or 'this shape'}" + ("" if variant == gemm_choices.ANY_VARIANT else f" ({variant})")
        return (
            f"no benchmark evidence that the Triton GEMMs beat cuBLAS(Lt) for {op_name} at {at}, "
            f"{'any dtype' if call.dtype is None else str(call.dtype).removeprefix('torch.')} on this GPU "
            "(fastvit/gemm_choices.json)"
        )

    return measured


@dispatch.register("ln_linear", "triton", supports=supports, measured=measured_choice("ln_linear"))
def ln_linear(x, ln_weight, ln_bias, weight, bias, eps, activation, residual, norm="layer", columns=None):
    residual_outside = None
    cast_x, ln_weight, ln_bias, weight, bias = cast_like_autocast_linear(
        x.device.type, x, ln_weight, ln_bias, weight, bias
    )
    if ln_weight is not None and norm == "layer" and cast_x.element_size() < x.element_size():
        cast_x = centred_in_dtype(x, cast_x.dtype)  # see centred_in_dtype: LayerNorm (not RMSNorm) is shift invariant
    x = cast_x
    if residual is not None and residual.dtype != x.dtype:  # under autocast: added as eager does (type promotion)
        residual_outside, residual = residual, None
    in_features = weight.shape[1]
    out_features = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
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
        NORM_CODES[norm],
        act_columns=-1 if columns is None else columns,
    )[0].view(*x.shape[:-1], out_features)
    return out if residual_outside is None else residual_outside + out


def mlp_supports(call) -> str | None:
    """Why the two Triton GEMMs do not cover ``ln_mlp``'s ``call``: every variant (LayerNorm / RMSNorm prologue,
    GELU / GELU-tanh / QuickGELU / SwiGLU epilogue, a hidden norm as fc2's prologue), so the dtype rule only."""
    return supports(call)


@dispatch.register("ln_mlp", "triton", supports=mlp_supports, measured=measured_choice("ln_mlp"))
def ln_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, norm, hidden_norm):
    """fc1 with the norm prologue and the activation epilogue (SwiGLU: gate and value tiles in one program), then
    fc2 with the hidden norm (if any) as its prologue and the bias + residual epilogue."""
    hidden = ln_linear(x, ln_weight, ln_bias, fc1_weight, fc1_bias, eps, act, None, norm)
    hidden_weight, hidden_bias, hidden_eps = hidden_norm if hidden_norm is not None else (None, None, eps)
    return ln_linear(
        hidden, hidden_weight, hidden_bias, fc2_weight, fc2_bias, hidden_eps, "none", x if residual else None, norm
    )


# ------------------------------------------------------------------------------------------------
# Custom ops: fastvit::ln_linear_fwd returns (out, mean, rstd, pre_act), the last three saved for the backward
# (empty when there is no norm / no LayerNorm mean / no activation or no backward to come). ``norm`` (NORM_CODES:
# 1 LayerNorm, 2 RMSNorm) is the prologue's kind when ``ln_weight`` is given; ``weight_value`` is SwiGLU's value
# half in timm's split layout (None: ``weight`` packs both halves); ``act_columns`` (>= 0) limits the activation to
# the output columns below it (-1: all). They trail the schema with defaults.

_FWD = (
    "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, Tensor? residual, float eps, "
    "int activation, bool save_pre_act, int norm=1, Tensor? weight_value=None, int act_columns=-1) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
_BWD = (
    "(Tensor grad_out, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor mean, Tensor rstd, Tensor weight, "
    "Tensor pre_act, int activation, bool has_bias, int norm=1, Tensor? weight_value=None, int act_columns=-1) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("fastvit::ln_linear_fwd", mutates_args=(), schema=_FWD)
def _ln_linear_fwd(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act, norm=1,
                   weight_value=None, act_columns=-1):  # fmt: skip
    return _forward(
        x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act, norm, weight_value, act_columns
    )


def _gate_rows(weight, weight_value, activation):
    """N: the GEMM's output width (half a packed SwiGLU weight's rows)."""
    packed = activation == ACTIVATION_CODES["swiglu"] and weight_value is None
    return weight.shape[0] // 2 if packed else weight.shape[0]


@_ln_linear_fwd.register_fake
def _(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act, norm=1, weight_value=None,
      act_columns=-1):  # fmt: skip
    rows, out_features = x.shape[0], _gate_rows(weight, weight_value, activation)
    pre_width = 2 * out_features if activation == ACTIVATION_CODES["swiglu"] else out_features
    has_norm = ln_weight is not None
    return (
        x.new_empty((rows, out_features)),
        x.new_empty((rows,) if has_norm and norm == NORM_CODES["layer"] else (0,), dtype=torch.float32),
        x.new_empty((rows,) if has_norm else (0,), dtype=torch.float32),
        x.new_empty((rows, pre_width) if save_pre_act else (0,)),
    )


@torch.library.custom_op("fastvit::ln_linear_bwd", mutates_args=(), schema=_BWD)
def _ln_linear_bwd(grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias, norm=1,
                   weight_value=None, act_columns=-1):  # fmt: skip
    return _backward(
        grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias, norm, weight_value,
        act_columns,
    )  # fmt: skip


@_ln_linear_bwd.register_fake
def _(grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias, norm=1, weight_value=None,
      act_columns=-1):  # fmt: skip
    out_features = _gate_rows(weight, weight_value, activation)
    weight_rows = 2 * out_features if activation == ACTIVATION_CODES["swiglu"] else out_features
    empty = weight.new_empty(0)
    return (
        x.new_empty(x.shape),
        weight.new_empty((weight_rows, x.shape[1])),
        weight.new_empty((weight_rows,) if has_bias else (0,)),
        empty if ln_weight is None else ln_weight.new_empty(ln_weight.shape),
        empty.clone() if ln_bias is None or ln_weight is None else ln_bias.new_empty(ln_bias.shape),
    )


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, residual, _eps, activation, _save, norm, weight_value, act_columns = inputs
    _out, mean, rstd, pre_act = output
    ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, weight, pre_act, weight_value)
    ctx.activation, ctx.has_bias, ctx.has_residual, ctx.norm = activation, bias is not None, residual is not None, norm
    ctx.act_columns = act_columns


@no_double_backward("ln_linear/ln_mlp")  # the GEMMs of both ops
def _ln_linear_backward(ctx, grad_out, _grad_mean, _grad_rstd, _grad_pre_act):
    x, ln_weight, ln_bias, mean, rstd, weight, pre_act, weight_value = ctx.saved_tensors
    if ctx.activation != ACTIVATION_CODES["none"] and pre_act.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError(
            "ln_linear: the forward ran without saving the pre-activation (no input required grad then); "
            "run it again with requires_grad set before calling backward"
        )
    grad_x, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias = torch.ops.fastvit.ln_linear_bwd(
        grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, ctx.activation, ctx.has_bias, ctx.norm,
        weight_value, ctx.act_columns,
    )  # fmt: skip
    grad_weight_value = None
    if weight_value is not None:  # timm's split layout: the packed gradient's halves
        grad_weight, grad_weight_value = grad_weight.chunk(2, dim=0)
    return (
        grad_x,
        None if ln_weight is None else grad_ln_weight,
        None if ln_bias is None or ln_weight is None else grad_ln_bias,
        grad_weight,
        grad_bias if ctx.has_bias else None,
        grad_out if ctx.has_residual else None,
        None,
        None,
        None,
        None,
        grad_weight_value,
        None,
    )


_ln_linear_fwd.register_autograd(_ln_linear_backward, setup_context=_setup_context)
