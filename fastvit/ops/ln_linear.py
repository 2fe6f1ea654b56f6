"""A Linear layer with its glue fused in: ``ops.ln_linear`` = ``act(Norm(x) @ weight.T + bias) + residual``.

Each part but the GEMM is optional: the norm before it (``ln_weight`` None: none; ``norm='layer'`` LayerNorm with
``ln_bias`` or without, ``norm='rms'`` RMSNorm), the bias, the activation ('none', 'gelu' = exact erf as timm's
``nn.GELU``, 'gelu_tanh', 'quick_gelu', 'swiglu' = ``silu(gate) * value`` on a packed [2N, K] weight, gate rows
first) and the residual add. The four Linears
of a ViT block are all of this form: qkv = ``ln_linear(x, norm1, qkv)``, proj = ``ln_linear(attn, None, None,
proj, residual=x)``, fc1 = ``ln_linear(x, norm2, fc1, activation='gelu')``, fc2 = ``ln_linear(h, None, None, fc2,
residual=x)``.

Backends:
  ``torch``   ``F.layer_norm`` / ``F.rms_norm``, ``F.linear``, the activation and ``residual +``, autograd by PyTorch.
  ``triton``  one Triton GEMM (``fastvit/ops/triton/linear.py``, kernels in ``fastvit/kernels/linear.py``): the
              norm applied to A tiles as they are loaded (no norm output in memory), bias, activation and residual
              in the epilogue; the backward fuses the activation's derivative into both gradient GEMMs and runs
              the norm's backward in Triton too.
``auto`` runs the Triton GEMM only where ``fastvit/gemm_choices.json`` holds benchmark evidence that it wins for
the (shape, dtype, GPU), else ``torch`` (cuBLAS). The spec is ``fastvit.reference.ln_linear``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastvit import dispatch, reference
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

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu", "swiglu")
NORMS = ("layer", "rms")


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
    *,
    norm: str = "layer",
    activation_columns: int | None = None,
) -> torch.Tensor:
    """``act(Norm(x) @ weight.T + bias) + residual``, every part but the GEMM optional.

    Args:
        x: [..., K] input (any strides).
        ln_weight: [K] norm weight, or None for no norm; ln_bias: [K] LayerNorm bias or None (none; always None
            for RMSNorm and without a norm).
        weight: [N, K] (``nn.Linear.weight``), or [2N, K] for 'swiglu' (gate rows first: timm's SwiGLUPacked;
            timm's split SwiGLU passes ``cat([fc1_g, fc1_x])``); bias: [N] ([2N] for 'swiglu') or None.
        eps: the norm's epsilon (ignored without a norm).
        activation: 'none', 'gelu' (exact erf), 'gelu_tanh', 'quick_gelu' (``z·σ(1.702z)``) or 'swiglu'
            (``silu(gate)·value``), applied after the bias, before the residual.
        residual: [..., N] with x's leading shape, added last; or None.
        backend: 'auto' | 'triton' | 'torch'; None = the process default.
        norm: 'layer' (LayerNorm) or 'rms' (RMSNorm, weight only): the kind of the norm when ``ln_weight`` is given.
        activation_columns: the activation applies to output columns ``[0, activation_columns)`` only, the rest are
            the plain ``Norm(x) @ weight.T + bias`` (timm's ``ParallelScalingBlock`` in_proj: the MLP's hidden
            columns, then q, k, v, in one GEMM); None: every column. Not with 'none' or 'swiglu'.

    Returns:
        [..., N].
    """
    in_features = check_features("x", x, "in_features K")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if ln_weight is None and ln_bias is not None:
        raise ValueError("ln_bias given without ln_weight: a norm before the GEMM needs its weight")
    if norm == "rms" and ln_bias is not None:
        raise ValueError("ln_bias must be None with norm='rms' (RMSNorm has no bias)")
    if ln_weight is not None:
        check_norm_params(in_features, ln_weight=ln_weight)
    if ln_bias is not None:
        check_norm_params(in_features, ln_bias=ln_bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    rows = (
        "[2N, K] (gate rows first), K = the last dimension of x"
        if activation == "swiglu"
        else "[N, K], K = the last dimension of x"
    )
    weight_rows = check_linear("weight", weight, "bias", bias, in_features, "N", rows)
    if activation == "swiglu" and weight_rows % 2:
        raise ValueError(f"weight must have an even number of rows with activation='swiglu' {rows}, got {weight_rows}")
    out_features = weight_rows // 2 if activation == "swiglu" else weight_rows
    if activation_columns is not None:
        if activation in ("none", "swiglu"):
            raise ValueError(f"activation_columns applies to a single-input activation, got activation={activation!r}")
        if isinstance(activation_columns, bool) or not isinstance(activation_columns, int):
            raise TypeError(f"activation_columns must be an int or None, got {type(activation_columns).__name__}")
        if not 0 <= activation_columns <= out_features:
            raise ValueError(f"activation_columns must be in [0, N={out_features}], got {activation_columns}")
    if residual is not None:
        check_tensor("residual", residual)
        meaning = "[..., N]: x's leading dimensions, N = weight.shape[0]"
        check_shape("residual", residual, (*x.shape[:-1], out_features), meaning)
    eps = check_eps(eps)
    tensors = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias, residual=residual)
    check_same_device(**tensors)
    check_same_dtype_outside_autocast(x.device, **tensors)
    call = gemm_call(x, in_features, out_features, ln_weight is not None)
    impl = dispatch.select("ln_linear", backend, call)
    if activation_columns is None or activation_columns == out_features:
        return impl(x, ln_weight, ln_bias, weight, bias, eps, activation, residual, norm)
    return impl(x, ln_weight, ln_bias, weight, bias, eps, activation, residual, norm, activation_columns)


@dispatch.register("ln_linear", "torch")
def _ln_linear_torch(x, ln_weight, ln_bias, weight, bias, eps, activation, residual, norm="layer", columns=None):
    if ln_weight is None:
        normed = x
    elif norm == "rms":
        normed = F.rms_norm(x, x.shape[-1:], ln_weight, eps)
    else:
        normed = F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps)
    out = reference.activate_columns(F.linear(normed, weight, bias), activation, columns)
    return out if residual is None else residual + out
