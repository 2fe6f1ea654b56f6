"""LayerNorm and RMSNorm over the last dimension: ``fastvit.ops.layer_norm``, ``fastvit.ops.rms_norm``.

Backends: ``torch`` (``F.layer_norm``) and ``cuda`` (``fastvit/ops/cuda/layer_norm.py``: the extension's
kernels, CUDA on CUDA tensors and C++ on CPU tensors, every floating dtype; fp32 statistics, deterministic
dweight/dbias reduction). Under ``torch.autocast`` LayerNorm computes in float32 and returns float32, as
autocast does for ``layer_norm`` (it is on autocast's float32 list), whichever backend runs.

``rms_norm``: ``torch`` (``F.rms_norm``) and ``cuda`` (the same extension kernels with ``rms=True``: the mean is not
subtracted). Under autocast it computes in float32 and returns float32 too (timm's RmsNorm upcasts likewise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvit import dispatch
from fastvit.validation import (
    autocast_enabled,
    check_eps,
    check_features,
    check_norm_params,
    check_same_device,
    check_same_dtype_outside_autocast,
)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """LayerNorm of ``x`` [..., C] with affine ``weight``, ``bias`` [C]; biased variance, fp32 statistics.

    Args:
        x: [..., C].
        weight, bias: [C].
        eps: added to the variance; positive.
        backend: 'auto' | 'cuda' | 'torch' (the backends implementing it); None = the process default.
    """
    check_norm_params(check_features("x", x, "the normalised width"), weight=weight, bias=bias)
    check_same_device(x=x, weight=weight, bias=bias)
    check_same_dtype_outside_autocast(x.device, x=x, weight=weight, bias=bias)
    eps = check_eps(eps)
    return dispatch.select("layer_norm", backend, norm_call(x))(x, weight, bias, eps)


def norm_call(x: torch.Tensor) -> dispatch.DeviceDtypeCall:
    """The call signature of a normalisation of ``x``: float32 under autocast (autocast's float32 list)."""
    dtype = x.dtype
    if dtype != torch.float64 and autocast_enabled(x.device):
        dtype = torch.float32
    return dispatch.DeviceDtypeCall(x.device, dtype)


@dispatch.register("layer_norm", "torch")
def _layer_norm_torch(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """RMSNorm of ``x`` [..., C] with ``weight`` [C]: ``x / sqrt(mean(x²) + eps) * weight``, fp32 statistics.

    Args:
        x: [..., C].
        weight: [C].
        eps: added to the mean square; positive.
        backend: 'auto' | 'cuda' | 'torch'; None = the process default.
    """
    check_norm_params(check_features("x", x, "the normalised width"), weight=weight)
    check_same_device(x=x, weight=weight)
    check_same_dtype_outside_autocast(x.device, x=x, weight=weight)
    eps = check_eps(eps)
    return dispatch.select("rms_norm", backend, norm_call(x))(x, weight, eps)


@dispatch.register("rms_norm", "torch")
def _rms_norm_torch(x, weight, eps):
    if autocast_enabled(x.device) and x.dtype != torch.float64:  # float32 under autocast, as layer_norm
        x, weight = x.float(), weight.float()
    return F.rms_norm(x, x.shape[-1:], weight, eps)
