"""The MLP half of a ViT block: ``fastvit.ops.ln_mlp`` = ``x + fc2(act(fc1(Norm(x))))`` and its variants.

Variants (keyword-only; the defaults are the plain ViT MLP): ``act`` 'gelu' | 'gelu_tanh' | 'quick_gelu' | 'swiglu'
(SwiGLU on a packed fc1 [2·Hid, C], gate rows first: timm's ``SwiGLUPacked``; timm's split ``SwiGLU`` passes
``cat([fc1_g, fc1_x])``), ``norm`` 'layer' | 'rms', biases optional (None), an optional norm over the hidden layer
before fc2 (``hidden_norm_weight``: timm's ``scale_mlp_norm`` / SwiGLU's sub-LN) and an optional LayerScale ``gamma``
on fc2's output (``layer_scale``), folded into fc2's weight and bias before any backend runs
(``gamma·(h·W2ᵀ + b2) = h·(gamma[:, None]·W2)ᵀ + gamma·b2``: no extra pass over the tokens).

Backends:
  ``torch``  ``F.layer_norm``/``F.rms_norm``, ``F.linear``, the activation and the residual folded into fc2's GEMM
             (``addmm``), autograd by PyTorch. Every variant.
  ``cuda``   the compiled extension's fused op (``fastvit/ops/cuda/ln_mlp.py``, csrc/ln_mlp): on CUDA tensors a
             LayerNorm/RMSNorm kernel, fc1 on cuBLASLt with a bias (and, for 'gelu_tanh', GELU) epilogue, one
             elementwise activation kernel otherwise, and fc2 with bias and the residual add in its epilogue; on
             CPU tensors its C++ implementation. With a hidden-layer norm, the same norm kernel over the activation
             before fc2. It saves x, the norm statistics and the fc1 pre-activation only: about half the activation
             memory of eager PyTorch. Every variant.
  ``triton`` two fused Triton GEMMs (``fastvit/ops/triton/linear.py``): fc1 with the LayerNorm / RMSNorm applied
             to its A tiles as they load and the bias + activation epilogue (SwiGLU: gate and value tiles side by
             side), fc2 with the hidden norm (if any) as its prologue and the bias + residual epilogue; Norm(x) is
             never written. Every variant. ``auto`` prefers it over ``cuda`` only where ``fastvit/gemm_choices.json``
             holds benchmark evidence for the (C x hidden, variant, dtype, GPU); an explicit ``backend='triton'``
             always runs it.
The spec they are tested against is ``fastvit.reference.ln_mlp``. Outside autocast every tensor must share one dtype
(TypeError otherwise); inside it the Linears compute in the autocast dtype, as eager autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastvit import dispatch, reference, validation
from fastvit.ops.linear_residual import fold_layer_scale, linear_residual_torch
from fastvit.ops.ln_linear import gemm_call

GELU_APPROXIMATIONS = ("none", "tanh")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")
NORMS = ("layer", "rms")


class MlpCall(NamedTuple):
    """The call signature of ``ln_mlp``: :class:`fastvit.ops.ln_linear.GemmCall`'s fields (the fc1 GEMM's shape
    bucket is (C, hidden)) plus the variant, which decides what each backend covers."""

    device: torch.device
    dtype: torch.dtype
    in_features: int
    out_features: int
    layer_norm: bool
    act: str = "gelu"
    norm: str = "layer"
    hidden_norm: bool = False


def mlp_call(
    x: torch.Tensor, width: int, hidden: int, act: str = "gelu", norm: str = "layer", hidden_norm: bool = False
) -> MlpCall:
    """:class:`MlpCall` of an ``ln_mlp`` on ``x`` (compute dtype as the GEMMs': autocast's inside autocast)."""
    device, dtype, in_features, out_features, _ = gemm_call(x, width, hidden, layer_norm=True)
    return MlpCall(device, dtype, in_features, out_features, True, act, norm, bool(hidden_norm))


def resolve_act(act: str | None, approximate: str | None) -> str:
    """The activation from ``act`` and the older ``approximate`` (GELU's 'none' | 'tanh', an alias of 'gelu' |
    'gelu_tanh'); ValueError when they disagree or are unknown."""
    if approximate is not None and approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS} (or None), got {approximate!r}")
    from_approximate = None if approximate is None else ("gelu_tanh" if approximate == "tanh" else "gelu")
    if act is None:
        return from_approximate or "gelu"
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if from_approximate is not None and from_approximate != act:
        raise ValueError(f"approximate={approximate!r} contradicts act={act!r}: pass act only")
    return act


def ln_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = 1e-6,
    approximate: str | None = None,
    residual: bool = True,
    backend: str | None = None,
    *,
    act: str | None = None,
    norm: str = "layer",
    hidden_norm_weight: torch.Tensor | None = None,
    hidden_norm_bias: torch.Tensor | None = None,
    hidden_norm_eps: float | None = None,
    layer_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Norm -> Linear -> activation [-> norm] -> Linear [* gamma] (+ residual).

    Args:
        x: [..., C] tokens.
        ln_weight: [C]; ln_bias: [C] or None (LayerNorm), None (RMSNorm).
        fc1_weight: [P, C] with P = Hid, or 2·Hid for ``act='swiglu'`` (gate rows first); fc1_bias: [P] or None.
        fc2_weight: [C, Hid]; fc2_bias: [C] or None.
        eps: epsilon of the norm before fc1 (1e-6 for timm ViTs, 1e-5 for CLIP).
        approximate: GELU form, 'none' or 'tanh': an alias of ``act='gelu'`` / ``'gelu_tanh'`` (None: ``act``).
        residual: add ``x`` to the output.
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.
        act: 'gelu' (exact erf, timm's default), 'gelu_tanh', 'quick_gelu' (``x·σ(1.702x)``) or 'swiglu'
            (``silu(a)·b`` on fc1's output halves ``a, b``); None = 'gelu' (or ``approximate``'s).
        norm: 'layer' (LayerNorm) or 'rms' (RMSNorm, weight only); also the kind of the hidden-layer norm.
        hidden_norm_weight: [Hid] weight of a norm over the hidden layer before fc2, or None for none;
            hidden_norm_bias: [Hid] or None (LayerNorm only); hidden_norm_eps: its epsilon (None: ``eps``).
        layer_scale: [C] LayerScale gamma multiplying fc2's output before the residual add, or None.

    Returns:
        [..., C].
    """
    act = resolve_act(act, approximate)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    width = validation.check_features("x", x, "the width C")
    validation.check_norm_params(width, ln_weight=ln_weight)
    if norm == "rms" and ln_bias is not None:
        raise ValueError("ln_bias must be None with norm='rms' (RMSNorm has no bias)")
    if ln_bias is not None:
        validation.check_norm_params(width, ln_bias=ln_bias)
    fc1_rows = "[2*hidden, C] (gate rows first)" if act == "swiglu" else "[hidden, C]"
    fc1_out = validation.check_linear("fc1_weight", fc1_weight, "fc1_bias", fc1_bias, width, "hidden", fc1_rows)
    if act == "swiglu" and fc1_out % 2:
        raise ValueError(f"fc1_weight must have an even number of rows with act='swiglu' {fc1_rows}, got {fc1_out}")
    hidden = fc1_out // 2 if act == "swiglu" else fc1_out
    meaning = f"[C, hidden] with hidden = fc1_weight.shape[0]{' / 2' if act == 'swiglu' else ''}"
    validation.check_linear("fc2_weight", fc2_weight, "fc2_bias", fc2_bias, hidden, "C", meaning, out_features=width)
    hidden_norm = None
    if hidden_norm_weight is not None:
        validation.check_norm_params(hidden, hidden_norm_weight=hidden_norm_weight)
        if hidden_norm_bias is not None:
            if norm == "rms":
                raise ValueError("hidden_norm_bias must be None with norm='rms' (RMSNorm has no bias)")
            validation.check_norm_params(hidden, hidden_norm_bias=hidden_norm_bias)
        hidden_norm = (
            hidden_norm_weight,
            hidden_norm_bias,
            validation.check_eps(eps if hidden_norm_eps is None else hidden_norm_eps),
        )
    elif hidden_norm_bias is not None or hidden_norm_eps is not None:
        raise ValueError("hidden_norm_bias / hidden_norm_eps given without hidden_norm_weight")
    if layer_scale is not None:
        validation.check_norm_params(width, layer_scale=layer_scale)
    eps = validation.check_eps(eps)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    names = ("x", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    tensors = dict(zip(names, (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)))
    tensors.update(hidden_norm_weight=hidden_norm_weight, hidden_norm_bias=hidden_norm_bias, layer_scale=layer_scale)
    validation.check_same_device(**tensors)
    validation.check_same_dtype_outside_autocast(x.device, **tensors)
    fc2_weight, fc2_bias = fold_layer_scale(fc2_weight, fc2_bias, layer_scale)
    impl = dispatch.select("ln_mlp", backend, mlp_call(x, width, hidden, act, norm, hidden_norm is not None))
    return impl(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, norm, hidden_norm
    )


def _norm_torch(x, weight, bias, eps, kind):
    return (
        F.rms_norm(x, x.shape[-1:], weight, eps) if kind == "rms" else F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    )


def _activation_torch(pre, act):
    """The activation of fc1's fresh output ``pre``: GELU overwrites it where no gradient is recorded (inference:
    one [rows, hidden] temporary fewer than eager's, the same values), else the spec's form."""
    if act in ("gelu", "gelu_tanh") and not (torch.is_grad_enabled() and pre.requires_grad):
        return torch.ops.aten.gelu_(pre, approximate="tanh" if act == "gelu_tanh" else "none")
    return reference.mlp_activation(pre, act)


@dispatch.register("ln_mlp", "torch")
def _ln_mlp_torch(
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, norm, hidden_norm
):
    hidden = _activation_torch(F.linear(_norm_torch(x, ln_weight, ln_bias, eps, norm), fc1_weight, fc1_bias), act)
    if hidden_norm is not None:
        hidden = _norm_torch(hidden, *hidden_norm, norm)
    if not residual:
        return F.linear(hidden, fc2_weight, fc2_bias)
    return linear_residual_torch(hidden, fc2_weight, fc2_bias, x)
