"""A Linear layer with the residual add in its GEMM: ``ops.linear_residual`` = ``residual + x @ weight.T + bias``.

In a ViT block it is the attention half's proj Linear and the residual add after it,
``x = x + proj(attn_out)``, as one op: the Linear's output is never written to memory on its own. An optional
LayerScale ``gamma`` (``x = x + gamma * proj(attn_out)``: DINOv2/v3, DeiT3, EVA02) is folded into the weight and bias
before any backend runs (:func:`fold_layer_scale`, shared with ``ops.ln_mlp``'s fc2), so every backend covers it.

Backends:
  ``torch``  ``residual + F.linear(x, weight, bias)``, autograd by PyTorch.
  ``cuda``   the compiled extension (``fastvit/ops/cuda/linear_residual.py``, csrc/linear): on CUDA tensors
             one cuBLASLt GEMM whose BIAS epilogue adds the bias and whose C operand (beta = 1) is the
             residual; on CPU tensors its C++ implementation (ATen matmuls), how CI tests the contract.
The spec both are tested against is ``fastvit.reference.linear_residual``.

Inputs: ``x``, ``weight`` and ``residual`` may have any strides. Outside autocast every tensor must share one
dtype (TypeError otherwise); inside it the Linear computes in the autocast dtype and the residual is added in
the promoted dtype, as eager ``residual + linear(x)`` would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvit import dispatch
from fastvit.validation import (
    autocast_dtype,
    check_features,
    check_linear,
    check_same_device,
    check_same_dtype_outside_autocast,
    check_shape,
    check_tensor,
)


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    backend: str | None = None,
    *,
    layer_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + layer_scale * (x @ weight.T + bias)``: a Linear layer with the residual add fused into its GEMM.

    Args:
        x: [..., K] input of the Linear (in a ViT block: the attention output [B, N, C]).
        weight: [N, K] (``nn.Linear.weight``).
        bias: [N] or None.
        residual: [..., N] with x's leading shape (in a ViT block: the block input [B, N, C]).
        backend: 'auto' | 'cuda' | 'torch' (the backends implementing it); None = the process default.
        layer_scale: [N] LayerScale gamma multiplying the Linear's output before the residual add (timm's
            ``ls1.gamma``), or None. Folded into ``weight`` and ``bias`` (:func:`fold_layer_scale`); its gradient
            flows back through the fold.

    Returns:
        [..., N].
    """
    in_features = check_features("x", x, "in_features K")
    out_features = check_linear("weight", weight, "bias", bias, in_features, "N", "[N, K], K = the last dimension of x")
    check_tensor("residual", residual)
    check_shape(
        "residual", residual, (*x.shape[:-1], out_features), "[..., N]: x's leading dimensions, N = weight.shape[0]"
    )
    if layer_scale is not None:
        check_tensor("layer_scale", layer_scale, ndim=1)
        check_shape("layer_scale", layer_scale, (out_features,), "[N], N = weight.shape[0]")
    tensors = dict(x=x, weight=weight, bias=bias, residual=residual, layer_scale=layer_scale)
    check_same_device(**tensors)
    check_same_dtype_outside_autocast(x.device, **tensors)
    weight, bias = fold_layer_scale(weight, bias, layer_scale)
    return dispatch.select("linear_residual", backend, linear_call(x))(x, weight, bias, residual)


def fold_layer_scale(
    weight: torch.Tensor, bias: torch.Tensor | None, layer_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear's weight [N, K] and bias [N] (or None) with a LayerScale gamma [N] on its output folded in (the same
    tensors when ``layer_scale`` is None): ``gamma·(x·Wᵀ + b) = x·(gamma[:, None]·W)ᵀ + gamma·b``, so no backend needs
    an extra pass over the tokens. Differentiable: autograd takes gamma's, W's and b's gradients through the fold.

    The folded weight is rounded once in the compute dtype (one more rounding of each product than eager's
    ``gamma * linear(x)``, which rounds the output instead).
    """
    if layer_scale is None:
        return weight, bias
    return layer_scale[:, None] * weight, None if bias is None else layer_scale * bias


def linear_call(x: torch.Tensor) -> dispatch.DeviceDtypeCall:
    """The call signature of an op replacing Linears on ``x``: their compute dtype is the autocast dtype inside
    autocast (float64 stays float64, as autocast leaves it), else x's."""
    amp = autocast_dtype(x.device)
    return dispatch.DeviceDtypeCall(x.device, x.dtype if amp is None or x.dtype == torch.float64 else amp)


@dispatch.register("linear_residual", "torch")
def linear_residual_torch(x, weight, bias, residual):
    """``residual + F.linear(x, weight, bias)``, as timm's block writes it. Where no gradient is recorded the add goes
    into the GEMM's fresh output when that keeps the result's dtype and shape (inference: no [rows, N] temporary; the
    same values, addition commutes). Under autograd it stays out of place: F.linear's 3-D output is a view of its 2-D
    GEMM output, and an in-place add on a view costs autograd a copy of the view and of its base in the backward."""
    out = F.linear(x, weight, bias)
    recorded = torch.is_grad_enabled() and out.requires_grad
    if not recorded and out.dtype == residual.dtype and out.shape == residual.shape:
        return out.add_(residual)
    return residual + out
