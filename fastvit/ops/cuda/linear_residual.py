"""The ``cuda`` backend of ``linear_residual``: the extension op ``fastvit::linear_residual_fwd/bwd`` (csrc/linear).

On CUDA tensors one cuBLASLt GEMM whose BIAS epilogue adds the bias and whose C operand (beta = 1) is the
residual; the backward is the input-gradient GEMM and the weight-gradient GEMM with the bias gradient from its
BGRADB epilogue (``at::sum`` in deterministic mode); the residual's gradient is ``grad_out`` itself (no copy).
On CPU tensors its C++ implementation (ATen matmuls). Non-contiguous x and residual are copied once; a
non-contiguous weight (e.g. a transposed view) is copied on every call (an ``nn.Linear`` weight is contiguous).

Autocast: custom ops are not cast by ``torch.autocast``, so this backend does what autocast does for the Linear
it replaces: x, weight and bias are cast (differentiably) to the autocast dtype; if the residual has that dtype
too it is added in the GEMM, else (an fp32 residual stream under bf16 autocast) it is added outside the op in
the promoted dtype, as eager ``residual + linear(x)`` would.
"""

from __future__ import annotations

import torch

from fastvit import dispatch
from fastvit.ops.cuda.extension import register_extension_op
from fastvit.ops.cuda.ln_mlp import supports
from fastvit.validation import cast_like_autocast_linear, check_same_dtype


@dispatch.register("linear_residual", "cuda", supports=supports)
def linear_residual(x, weight, bias, residual):
    residual_outside = None
    x, weight, bias = cast_like_autocast_linear(x.device.type, x, weight, bias)
    if residual.dtype != x.dtype:  # as eager autocast: residual + linear(x) in the promoted dtype
        residual_outside, residual = residual, None
    check_same_dtype(x=x, weight=weight, bias=bias, residual=residual)
    out = torch.ops.fastvit.linear_residual_fwd(x, weight, bias, residual)
    return out if residual_outside is None else residual_outside + out


def _fake_forward(x, weight, bias, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fake_backward(grad_out, x, weight, need_grad_x, need_grad_weight, need_grad_bias, deterministic):
    return (
        x.new_empty(x.shape if need_grad_x else (0,)),
        x.new_empty(weight.shape if need_grad_weight else (0,)),
        x.new_empty((weight.shape[0] if need_grad_bias else 0,)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias, _ = ctx.needs_input_grad
    need_bias = need_bias and ctx.has_bias
    grad_x, grad_weight, grad_bias = torch.ops.fastvit.linear_residual_bwd(
        grad_out, x, weight, need_x, need_weight, need_bias, dispatch.deterministic_enabled()
    )
    return (
        grad_x if need_x else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        grad_out if ctx.has_residual else None,  # d(residual) = grad_out: passed through, no copy
    )


register_extension_op(
    "linear_residual", fakes={"linear_residual_fwd": _fake_forward, "linear_residual_bwd": _fake_backward},
    backward=_backward, setup_context=_setup_context,
)  # fmt: skip
