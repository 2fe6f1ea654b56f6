"""The MLP half of a ViT block: ``fastvit.ops.ln_mlp`` = ``x + fc2(gelu(fc1(LayerNorm(x))))``.

Backends:
  ``torch``  ``F.layer_norm``, ``F.linear``, ``F.gelu`` and the residual folded into fc2's GEMM
             (``addmm``), autograd by PyTorch.
  ``cuda``   the compiled extension's fused op (``fastvit/ops/cuda/ln_mlp.py``, csrc/ln_mlp): on CUDA
             tensors a LayerNorm kernel, fc1 on cuBLASLt with a bias (and, for ``approximate='tanh'``,
             GELU) epilogue, an exact-GELU kernel, and fc2 with bias and the residual add in its
             epilogue; on CPU tensors its C++ implementation. It saves x, the LN statistics and the fc1
             pre-activation only: about half the activation memory of eager PyTorch.
The spec both are tested against is ``fastvit.reference.ln_mlp``. Outside autocast every tensor must share
one dtype (TypeError otherwise); inside it the Linears compute in the autocast dtype, as eager autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvit import dispatch
from fastvit.ops.linear_residual import linear_call, linear_residual_torch
from fastvit.validation import (
    check_eps,
    check_features,
    check_linear,
    check_norm_params,
    check_same_device,
    check_same_dtype_outside_autocast,
)

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
    width = check_features("x", x, "the width C")
    check_norm_params(width, ln_weight=ln_weight, ln_bias=ln_bias)
    hidden = check_linear("fc1_weight", fc1_weight, "fc1_bias", fc1_bias, width, "hidden", "[hidden, C]")
    meaning = "[C, hidden] with hidden = fc1_weight.shape[0]"
    check_linear("fc2_weight", fc2_weight, "fc2_bias", fc2_bias, hidden, "C", meaning, out_features=width)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    eps = check_eps(eps)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    names = ("x", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    tensors = dict(zip(names, (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)))
    check_same_device(**tensors)
    check_same_dtype_outside_autocast(x.device, **tensors)
    impl = dispatch.select("ln_mlp", backend, linear_call(x))
    return impl(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual)


@dispatch.register("ln_mlp", "torch")
def _ln_mlp_torch(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual):
    hidden = F.gelu(
        F.linear(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), fc1_weight, fc1_bias), approximate=approximate
    )
    if not residual:
        return F.linear(hidden, fc2_weight, fc2_bias)
    return linear_residual_torch(hidden, fc2_weight, fc2_bias, x)
