"""The MLP half of a ViT block: ``fastvit.ops.ln_mlp`` = ``x + fc2(gelu(fc1(LayerNorm(x))))``.

Backends: ``torch`` (the reference).
"""

from __future__ import annotations

import torch

from fastvit import dispatch, reference
from fastvit.ops._validate import check_same_device, check_shape, check_tensor

GELU_APPROXIMATIONS = ("none", "tanh")


def ln_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm -> Linear -> GELU -> Linear (+ residual).

    Args:
        x: [..., C] tokens.
        ln_weight, ln_bias: [C] LayerNorm affine parameters.
        fc1_weight: [Hid, C]; fc1_bias: [Hid] or None.
        fc2_weight: [C, Hid]; fc2_bias: [C] or None.
        eps: LayerNorm epsilon (1e-6 for timm ViTs, 1e-5 for CLIP).
        approximate: GELU form, 'none' (exact erf, timm's default) or 'tanh'.
        residual: add ``x`` to the output.
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.

    Returns:
        [..., C].
    """
    check_tensor("x", x, min_ndim=1)
    width = x.shape[-1]
    check_tensor("ln_weight", ln_weight, ndim=1)
    check_tensor("ln_bias", ln_bias, ndim=1)
    check_shape("ln_weight", ln_weight, (width,), "the last dimension of x")
    check_shape("ln_bias", ln_bias, (width,), "the last dimension of x")
    check_tensor("fc1_weight", fc1_weight, ndim=2)
    hidden = fc1_weight.shape[0]
    check_shape("fc1_weight", fc1_weight, (hidden, width), "[hidden, C]")
    check_tensor("fc2_weight", fc2_weight, ndim=2)
    check_shape("fc2_weight", fc2_weight, (width, hidden), "[C, hidden] with hidden = fc1_weight.shape[0]")
    if fc1_bias is not None:
        check_tensor("fc1_bias", fc1_bias, ndim=1)
        check_shape("fc1_bias", fc1_bias, (hidden,), "[hidden]")
    if fc2_bias is not None:
        check_tensor("fc2_bias", fc2_bias, ndim=1)
        check_shape("fc2_bias", fc2_bias, (width,), "[C]")
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    check_same_device(
        x=x,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    impl = dispatch.implementation("ln_mlp", backend, x.device)
    return impl(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps), approximate, residual)


@dispatch.register("ln_mlp", "torch")
def _ln_mlp_torch(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual):
    return reference.ln_mlp(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual
    )
