"""A Linear layer with its glue fused in: ``ops.ln_linear`` = ``act(LayerNorm(x) @ weight.T + bias) + residual``.

Each part but the GEMM is optional: the LayerNorm before it (``ln_weight``/``ln_bias`` None: none), the bias, the
activation ('none', 'gelu' = exact erf as timm's ``nn.GELU``, 'gelu_tanh') and the residual add. The four Linears
of a ViT block are all of this form: qkv = ``ln_linear(x, norm1, qkv)``, proj = ``ln_linear(attn, None, None,
proj, residual=x)``, fc1 = ``ln_linear(x, norm2, fc1, activation='gelu')``, fc2 = ``ln_linear(h, None, None, fc2,
residual=x)``.

Backends:
  ``torch``   ``F.layer_norm``, ``F.linear``, ``F.gelu`` and ``residual +``, autograd by PyTorch.
  ``triton``  one Triton GEMM (``fastvit/ops/triton/linear.py``, kernels in ``fastvit/kernels/linear.py``): the
              LayerNorm applied to A tiles as they are loaded (no LayerNorm output in memory), bias, activation and
              residual in the epilogue; the backward fuses the activation's derivative into both gradient GEMMs.
``auto`` runs the Triton GEMM only where ``fastvit/gemm_choices.json`` holds benchmark evidence that it wins for
the (shape, dtype, GPU), else ``torch`` (cuBLAS). The spec is ``fastvit.reference.ln_linear``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastvit import dispatch
from fastvit.ops.linear_residual import linear_call
from fastvit.validation import (
    check_eps,
    check_features,
    check_linear,
    check_norm_params,
    check_same_device,
    check_same_dtype_outside_autocast,
    check_shape,
    check_tensor,
)

ACTIVATIONS = ("none", "gelu", "gelu_tanh")
GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}  # activation -> F.gelu's approximate


class GemmCall(NamedTuple):
    """The call signature of ops built on fused GEMMs: device, compute dtype, the GEMM's (in, out) features (the
    shape bucket of ``fastvit.gemm_choices``) and whether a LayerNorm prologue runs."""

    device: torch.device
    dtype: torch.dtype
    in_features: int
    out_features: int
    layer_norm: bool


def gemm_call(x: torch.Tensor, in_features: int, out_features: int, layer_norm: bool) -> GemmCall:
    """:class:`GemmCall` of a GEMM on ``x`` (compute dtype as :func:`linear_call`: autocast's inside autocast)."""
    device, dtype = linear_call(x)
    return GemmCall(device, dtype, int(in_features), int(out_features), bool(layer_norm))


def ln_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(LayerNorm(x) @ weight.T + bias) + residual``, every part but the GEMM optional.

    Args:
        x: [..., K] input (any strides).
        ln_weight, ln_bias: [K] LayerNorm affine parameters, or both None for no LayerNorm.
        weight: [N, K] (``nn.Linear.weight``); bias: [N] or None.
        eps: LayerNorm epsilon (ignored without LayerNorm).
        activation: 'none', 'gelu' (exact erf) or 'gelu_tanh', applied after the bias, before the residual.
        residual: [..., N] with x's leading shape, added last; or None.
        backend: 'auto' | 'triton' | 'torch'; None = the process default.

    Returns:
        [..., N].
    """
    in_features = check_features("x", x, "in_features K")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must both be tensors (a LayerNorm before the GEMM) or both None")
    if ln_weight is not None:
        check_norm_params(in_features, ln_weight=ln_weight, ln_bias=ln_bias)
    out_features = check_linear("weight", weight, "bias", bias, in_features, "N", "[N, K], K = the last dimension of x")
    if residual is not None:
        check_tensor("residual", residual)
        meaning = "[..., N]: x's leading dimensions, N = weight.shape[0]"
        check_shape("residual", residual, (*x.shape[:-1], out_features), meaning)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    eps = check_eps(eps)
    tensors = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias, residual=residual)
    check_same_device(**tensors)
    check_same_dtype_outside_autocast(x.device, **tensors)
    call = gemm_call(x, in_features, out_features, ln_weight is not None)
    impl = dispatch.select("ln_linear", backend, call)
    return impl(x, ln_weight, ln_bias, weight, bias, eps, activation, residual)


@dispatch.register("ln_linear", "torch")
def _ln_linear_torch(x, ln_weight, ln_bias, weight, bias, eps, activation, residual):
    normed = x if ln_weight is None else F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps)
    out = F.linear(normed, weight, bias)
    out = out if activation == "none" else F.gelu(out, approximate=GELU_APPROXIMATE[activation])
    return out if residual is None else residual + out
