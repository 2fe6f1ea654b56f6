"""The ``cuda`` backend of ``ln_mlp``: the extension op ``fastvit::ln_mlp_fwd/bwd`` (csrc/ln_mlp), fake impls, autograd.

On CUDA tensors: a LayerNorm / RMSNorm kernel, fc1 on cuBLASLt with a bias (and, for ``act='gelu_tanh'``, GELU)
epilogue, one elementwise kernel for the other activations (exact GELU, QuickGELU, SwiGLU), the optional norm over
the hidden layer (timm's ``scale_mlp_norm``, EVA02's SwiGLU sub-LN: the same norm kernel over [M, Hid], of the input
norm's kind), fc2 with bias and the residual add in its epilogue; the backward fuses dGELU and the bias gradients into
the GEMMs where cuBLASLt can (not through a hidden norm, whose backward kernels sit between fc2's input gradient and
the activation's). On CPU tensors the C++ implementation. The forward saves x, the norm statistics and the fc1
pre-activation (not Norm(x), the activation's output nor the hidden norm's output or statistics, which the backward
recomputes). LayerScale arrives folded into fc2 (ops.ln_mlp).

Autocast: custom ops are not cast by ``torch.autocast``, so this backend does what autocast does for the Linear
layers it replaces: inside an autocast region it runs the fused op in the autocast dtype (the parameters are
cast, differentiably, so fp32 master weights get fp32 gradients; x is centred in its own precision before it is
rounded, see ``fastvit.validation.centred_in_dtype``) and adds the residual outside the op in x's own dtype, as eager
autocast would (fp32 + bf16 -> fp32). Deterministic mode (``fastvit.set_deterministic`` /
``torch.use_deterministic_algorithms``) makes the backward bit-identical run to run.
"""

from __future__ import annotations

import torch

from fastvit import dispatch
from fastvit.ops.cuda.extension import register_extension_op
from fastvit.validation import cast_like_autocast_linear, centred_in_dtype, check_same_dtype


def supports(call: dispatch.DeviceDtypeCall) -> str | None:
    """Why the extension does not run ``call`` (a device/dtype call, or ``ops.ln_mlp``'s ``MlpCall``: every act, norm
    and hidden-layer norm of it is covered), or None."""
    return dispatch.kernel_dtype_reason("cuda", call.device, (call.dtype,))


@dispatch.register("ln_mlp", "cuda", supports=supports)
def ln_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, norm, hidden_norm):
    hidden_norm_weight, hidden_norm_bias, hidden_norm_eps = (None, None, eps) if hidden_norm is None else hidden_norm
    params = (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_norm_weight, hidden_norm_bias)
    residual_outside = None
    cast_x, *params = cast_like_autocast_linear(x.device.type, x, *params)
    if cast_x.dtype != x.dtype:
        if residual:  # as eager autocast: the residual added in x's dtype
            residual_outside, residual = x, False
        if cast_x.element_size() < x.element_size() and norm == "layer":  # RMSNorm is not shift invariant
            cast_x = centred_in_dtype(x, cast_x.dtype)
    x = cast_x
    ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_norm_weight, hidden_norm_bias = params
    check_same_dtype(
        x=x, ln_weight=ln_weight, ln_bias=ln_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
        fc2_weight=fc2_weight, fc2_bias=fc2_bias, hidden_norm_weight=hidden_norm_weight,
        hidden_norm_bias=hidden_norm_bias,
    )  # fmt: skip
    # The fc1 pre-activation is kept only when a backward can follow (not under no_grad/inference).
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    out = torch.ops.fastvit.ln_mlp_fwd(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, save, norm == "rms",
        hidden_norm_weight, hidden_norm_bias, hidden_norm_eps,
    )[0]  # fmt: skip
    return out if residual_outside is None else residual_outside + out


def _fake_forward(
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, save_for_backward, rms=False,
    hidden_norm_weight=None, hidden_norm_bias=None, hidden_norm_eps=1e-6,
):  # fmt: skip
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = x.new_empty(x.shape[:-1], dtype=stats_dtype)
    pre_act = x.new_empty((*x.shape[:-1], fc1_weight.shape[0]) if save_for_backward else (0,))
    return x.new_empty(x.shape), mean, torch.empty_like(mean), pre_act


def _fake_backward(
    grad_out, x, ln_weight, ln_bias, mean, rstd, fc1_weight, pre_act, fc2_weight, act, residual, deterministic,
    rms=False, hidden_norm_weight=None, hidden_norm_bias=None, hidden_norm_eps=1e-6,
):  # fmt: skip
    hidden_norm_shape = (0,) if hidden_norm_weight is None else hidden_norm_weight.shape  # [Hid], or [0]: no norm
    return (
        x.new_empty(x.shape),
        ln_weight.new_empty(ln_weight.shape),
        ln_weight.new_empty(ln_weight.shape),
        fc1_weight.new_empty(fc1_weight.shape),
        fc1_weight.new_empty(fc1_weight.shape[:1]),
        fc2_weight.new_empty(fc2_weight.shape),
        fc2_weight.new_empty(fc2_weight.shape[:1]),
        x.new_empty(hidden_norm_shape),
        x.new_empty(hidden_norm_shape),
    )


# The schema defaults of ln_mlp_fwd's trailing arguments: rms, hidden_norm_weight, hidden_norm_bias, hidden_norm_eps.
_TRAILING_DEFAULTS = (False, None, None, 1e-6)


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _eps, act, residual, _save, *rest = inputs
    rms, hidden_norm_weight, hidden_norm_bias, hidden_norm_eps = (*rest, *_TRAILING_DEFAULTS[len(rest) :])
    _out, mean, rstd, pre_act = output
    ctx.save_for_backward(
        x, ln_weight, ln_bias, mean, rstd, fc1_weight, pre_act, fc2_weight, hidden_norm_weight, hidden_norm_bias
    )
    ctx.act, ctx.residual, ctx.rms, ctx.hidden_norm_eps = act, residual, bool(rms), hidden_norm_eps
    ctx.num_inputs = len(inputs)
    ctx.has_bias = {name: t is not None for name, t in (("ln", ln_bias), ("fc1", fc1_bias), ("fc2", fc2_bias),
                                                         ("hidden_norm", hidden_norm_bias))}  # fmt: skip


def _backward(ctx, grad_out, _grad_mean, _grad_rstd, _grad_pre_act):
    x, ln_weight, ln_bias, mean, rstd, fc1_weight, pre_act, fc2_weight, hn_weight, hn_bias = ctx.saved_tensors
    grads = torch.ops.fastvit.ln_mlp_bwd(
        grad_out, x, ln_weight, ln_bias, mean, rstd, fc1_weight, pre_act, fc2_weight,
        ctx.act, ctx.residual, dispatch.deterministic_enabled(), ctx.rms, hn_weight, hn_bias, ctx.hidden_norm_eps,
    )  # fmt: skip
    grad_x, grad_lnw, grad_lnb, grad_w1, grad_b1, grad_w2, grad_b2, grad_hnw, grad_hnb = grads
    has = ctx.has_bias
    by_input = [
        grad_x, grad_lnw, grad_lnb if has["ln"] else None, grad_w1, grad_b1 if has["fc1"] else None, grad_w2,
        grad_b2 if has["fc2"] else None, None, None, None, None, None,  # eps, act, residual, save, rms
        grad_hnw if hn_weight is not None else None, grad_hnb if has["hidden_norm"] else None, None,
    ]  # fmt: skip
    return tuple(by_input[: ctx.num_inputs])


register_extension_op(
    "ln_mlp", fakes={"ln_mlp_fwd": _fake_forward, "ln_mlp_bwd": _fake_backward},
    backward=_backward, setup_context=_setup_context,
)  # fmt: skip
