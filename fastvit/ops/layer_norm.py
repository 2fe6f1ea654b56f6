"""LayerNorm over the last dimension: ``fastvit.ops.layer_norm``.

Backends: ``torch`` (``F.layer_norm``) and ``cuda`` (``torch.ops.fastvit.layer_norm_fwd`` from the
compiled extension: CUDA kernel on CUDA tensors, C++ kernel on CPU tensors). The extension op
returns (out, mean, rstd); its autograd, registered here, calls the extension's
``torch.ops.fastvit.layer_norm_bwd`` on the saved x, weight, mean and rstd (fp32 math, deterministic
dweight/dbias reduction). The backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import torch

from fastvit import dispatch, reference
from fastvit.ops._validate import (
    check_same_device,
    check_same_dtype,
    check_same_dtype_outside_autocast,
    check_shape,
    check_tensor,
)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """LayerNorm of ``x`` [..., C] with affine ``weight``, ``bias`` [C]; biased variance, fp32 statistics."""
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x's last dimension (the normalised width) must be >= 1, got x of shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=1)
    check_tensor("bias", bias, ndim=1)
    check_shape("weight", weight, (x.shape[-1],), "the last dimension of x")
    check_shape("bias", bias, (x.shape[-1],), "the last dimension of x")
    check_same_device(x=x, weight=weight, bias=bias)
    check_same_dtype_outside_autocast(x.device, x=x, weight=weight, bias=bias)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < float("inf"):  # NaN fails too
        raise ValueError(f"eps must be a non-negative finite number, got {eps!r}")
    return dispatch.implementation("layer_norm", backend, x.device)(x, weight, bias, float(eps))


@dispatch.register("layer_norm", "torch")
def _layer_norm_torch(x, weight, bias, eps):
    return reference.layer_norm(x, weight, bias, eps)


@dispatch.register("layer_norm", "cuda")
def _layer_norm_extension(x, weight, bias, eps):
    check_same_dtype(x=x, weight=weight, bias=bias)
    return torch.ops.fastvit.layer_norm_fwd(x, weight, bias, eps)[0]


def _register_extension_op() -> None:
    """Fake (meta) impl and autograd for the C++ op, so torch.compile and backward see through it."""

    @torch.library.register_fake("fastvit::layer_norm_fwd")
    def _(x, weight, bias, eps):
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats = x.new_empty(x.shape[:-1], dtype=stats_dtype)
        return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)

    @torch.library.register_fake("fastvit::layer_norm_bwd")
    def _(grad_out, x, weight, mean, rstd):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
        )

    def setup_context(ctx, inputs, output):
        x, weight, _bias, _eps = inputs
        _out, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.fastvit.layer_norm_bwd(grad_out, x, weight, mean, rstd)
        return grad_x, grad_weight, grad_bias, None

    torch.library.register_autograd("fastvit::layer_norm_fwd", backward, setup_context=setup_context)


if dispatch.backend_unusable_reason("cuda", torch.device("cpu")) is None:
    _register_extension_op()
