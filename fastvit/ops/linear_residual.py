"""A Linear layer with the residual add in its GEMM: ``ops.linear_residual`` = ``residual + x @ weight.T + bias``.

In a ViT block it is the attention half's proj Linear and the residual add after it,
``x = x + proj(attn_out)``, as one op: the Linear's output is never written to memory on its own.

Backends:
  ``torch``  the reference (``fastvit.reference.linear_residual``), autograd by PyTorch.
  ``cuda``   the compiled extension's ops ``torch.ops.fastvit.linear_residual_fwd`` / ``_bwd``
             (csrc/linear): on CUDA tensors one cuBLASLt GEMM whose BIAS epilogue adds the bias and
             whose C operand (beta = 1) is the residual; the backward is the input-gradient GEMM and
             the weight-gradient GEMM with the bias gradient from its BGRADB epilogue (``at::sum`` in
             deterministic mode); the residual's gradient is ``grad_out`` itself (no copy). On CPU
             tensors its C++ implementation (ATen matmuls), which is how CI tests the contract.

Inputs: ``x`` and ``residual`` may have any strides (non-contiguous ones are copied once); a
non-contiguous ``weight`` (e.g. a transposed view) is accepted and copied to a contiguous one on every
call (an ``nn.Linear`` weight is contiguous: no copy).

Autocast: custom ops are not cast by ``torch.autocast``, so the ``cuda`` backend does what autocast
does for the Linear it replaces: x, weight and bias are cast (differentiably) to the autocast dtype;
if the residual has that dtype too it is added in the GEMM, else (an fp32 residual stream under bf16
autocast) it is added outside the op in the promoted dtype, as eager ``residual + linear(x)`` would.
Outside autocast every tensor must share one dtype (TypeError otherwise).
"""

from __future__ import annotations

import torch

from fastvit import dispatch, reference
from fastvit.ops._validate import (
    cast_like_autocast_linear,
    check_same_device,
    check_same_dtype,
    check_same_dtype_outside_autocast,
    check_shape,
    check_tensor,
)

CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the C++ CPU path also takes float64


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """``residual + x @ weight.T + bias``: a Linear layer with the residual add fused into its GEMM.

    Args:
        x: [..., K] input of the Linear (in a ViT block: the attention output [B, N, C]).
        weight: [N, K] (``nn.Linear.weight``).
        bias: [N] or None.
        residual: [..., N] with x's leading shape (in a ViT block: the block input [B, N, C]).
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.

    Returns:
        [..., N], contiguous.
    """
    check_tensor("x", x, min_ndim=1)
    in_features = x.shape[-1]
    if in_features == 0:
        raise ValueError(f"x's last dimension (in_features K) must be >= 1, got x of shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2)
    out_features = weight.shape[0]
    if out_features == 0:
        raise ValueError(f"weight must have at least one output feature (N >= 1), got {tuple(weight.shape)}")
    check_shape("weight", weight, (out_features, in_features), "[N, K], K = the last dimension of x")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (out_features,), "[N], N = weight.shape[0]")
    check_tensor("residual", residual)
    check_shape(
        "residual", residual, (*x.shape[:-1], out_features), "[..., N]: x's leading dimensions, N = weight.shape[0]"
    )
    tensors = dict(x=x, weight=weight, bias=bias, residual=residual)
    check_same_device(**tensors)
    check_same_dtype_outside_autocast(x.device, **tensors)
    why = None
    if x.device.type == "cuda" and x.dtype not in CUDA_KERNEL_DTYPES:  # autocast leaves float64 as it is
        why = f"x is {x.dtype} (the CUDA kernels take float16, bfloat16, float32)"
    backend = dispatch.reference_for_uncovered_input("linear_residual", backend, x.device, why)
    return dispatch.implementation("linear_residual", backend, x.device)(x, weight, bias, residual)


@dispatch.register("linear_residual", "torch")
def _linear_residual_torch(x, weight, bias, residual):
    return reference.linear_residual(x, weight, bias, residual)


@dispatch.register("linear_residual", "cuda")
def _linear_residual_extension(x, weight, bias, residual):
    residual_outside = None
    x, weight, bias = cast_like_autocast_linear(x.device.type, x, weight, bias)
    if residual.dtype != x.dtype:  # as eager autocast: residual + linear(x) in the promoted dtype
        residual_outside, residual = residual, None
    check_same_dtype(x=x, weight=weight, bias=bias, residual=residual)
    out = torch.ops.fastvit.linear_residual_fwd(x, weight, bias, residual)
    return out if residual_outside is None else residual_outside + out


def _register_extension_ops() -> None:
    """Fake (meta) impls and autograd for the C++ ops, so torch.compile and backward see through them."""

    @torch.library.register_fake("fastvit::linear_residual_fwd")
    def _(x, weight, bias, residual):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("fastvit::linear_residual_bwd")
    def _(grad_out, x, weight, need_grad_x, need_grad_weight, need_grad_bias, deterministic):
        return (
            x.new_empty(x.shape if need_grad_x else (0,)),
            x.new_empty(weight.shape if need_grad_weight else (0,)),
            x.new_empty((weight.shape[0] if need_grad_bias else 0,)),
        )

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None

    def backward(ctx, grad_out):
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

    torch.library.register_autograd("fastvit::linear_residual_fwd", backward, setup_context=setup_context)


if dispatch.backend_unusable_reason("cuda", torch.device("cpu")) is None:
    _register_extension_ops()
