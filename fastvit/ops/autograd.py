"""Autograd helpers shared by the fused backends."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def no_double_backward(op_name: str) -> Callable[[Callable], Callable]:
    """Decorate a fused op's backward so that differentiating through it again raises instead of answering 0.

    The fused backward kernels are not themselves differentiable. ``torch.autograd.grad(..., create_graph=True)``
    runs the backward with grad mode on; a C++ op would then return gradients without a graph (second
    derivatives silently 0, parameter gradients of a gradient penalty missing). So when grad mode is on and
    anything the backward reads requires grad, raise and name the way out.
    """

    def decorator(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled() and (
                any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads)
                or any(t is not None and t.requires_grad for t in ctx.saved_tensors)
            ):
                raise RuntimeError(
                    f"{op_name}: the fused backward is not differentiable (double backward, create_graph=True, is "
                    f"not supported); run this op with backend='torch' for higher-order gradients"
                )
            return backward(ctx, *grads)

        return wrapper

    return decorator
