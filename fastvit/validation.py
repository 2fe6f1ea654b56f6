"""Argument checks shared by the ops, layers and model: clear ``TypeError``/``ValueError`` naming the argument.

Plain ``if``/``raise`` (never ``assert``, which ``python -O`` strips).
"""

from __future__ import annotations

import torch


def check_tensor(name: str, value: object, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """``value`` must be a floating-point tensor (of rank ``ndim``, or at least ``min_ndim``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {value.dtype}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), got {tuple(value.shape)}")


def check_features(name: str, x: object, meaning: str) -> int:
    """``x`` [..., F]: a floating-point tensor of rank >= 1 whose last dimension (``meaning``) is >= 1; returns F."""
    check_tensor(name, x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"{name}'s last dimension ({meaning}) must be >= 1, got {name} of shape {tuple(x.shape)}")
    return x.shape[-1]


def check_linear(
    weight_name: str,
    weight: object,
    bias_name: str,
    bias: object,
    in_features: int,
    out: str,
    meaning: str,
    out_features: int | None = None,
) -> int:
    """A Linear's ``weight`` [out, in_features] (``out`` names its first dimension; ``out_features`` fixes it when
    given) and ``bias`` [out] or None; returns the number of output features."""
    check_tensor(weight_name, weight, ndim=2)
    if out_features is None:
        out_features = weight.shape[0]
        if out_features == 0:
            raise ValueError(
                f"{weight_name} must have at least one output feature ({out} >= 1), got {tuple(weight.shape)}"
            )
    check_shape(weight_name, weight, (out_features, in_features), meaning)
    if bias is not None:
        check_tensor(bias_name, bias, ndim=1)
        check_shape(bias_name, bias, (out_features,), f"[{out}] = {weight_name}.shape[0]")
    return out_features


def check_norm_params(width: int, **params: object) -> None:
    """Affine parameters of a normalisation over the last dimension: [width] floating-point tensors."""
    for name, value in params.items():
        check_tensor(name, value, ndim=1)
        check_shape(name, value, (width,), "the last dimension of x")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    present = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{name} {dtype}" for name, dtype in present.items())
        raise TypeError(f"all tensors must have one dtype, got {listing}")


def autocast_enabled(device: torch.device) -> bool:
    """True inside a ``torch.autocast`` region for ``device``'s type (never for devices autocast does not know)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts matmuls to on ``device``'s type, or None outside autocast."""
    return torch.get_autocast_dtype(device.type) if autocast_enabled(device) else None


def check_same_dtype_outside_autocast(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Outside autocast every tensor of an op must share one dtype (inside it, the op casts as autocast would)."""
    if not autocast_enabled(device):
        check_same_dtype(**tensors)


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_eps(value: object, name: str = "eps") -> float:
    """A normalisation epsilon: positive and finite (0 would divide by zero on a constant row)."""
    # Comparisons rather than math.isfinite: torch.compile traces them as constants (NaN fails too).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_scale(value: object) -> float | None:
    if value is None:
        return None
    # Comparisons rather than math.isfinite: torch.compile traces them as constants (NaN fails too).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"scale must be None or a positive finite number, got {value!r}")
    return float(value)


def check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def cast_like_autocast_linear(device_type: str, *tensors: torch.Tensor | None) -> tuple:
    """``tensors`` as autocast would feed a Linear on ``device_type``: floating tensors other than fp64 cast to
    the autocast dtype when autocast is on (None passes through). Custom ops see no autocast of their own, so
    ops that replace Linears apply its rule here, before the call."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def centred_in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x - mean(x)`` (row mean in x's precision, not differentiated) rounded to ``dtype``: the op's LayerNorm input.

    Eager autocast runs LayerNorm in fp32 and rounds its output; the fused op takes its LayerNorm input in the
    autocast dtype. Rounding x itself would cost ``eps(dtype) * |mean| / std`` of the normalised row (large for
    rows far from zero mean); LayerNorm is shift invariant, so rounding the centred row instead costs
    ``eps(dtype)`` of it, the size of the rounding eager autocast applies to LayerNorm's output. The mean is
    detached: LayerNorm's gradient has zero row mean, so the mean's gradient term is exactly 0.
    """
    return (x - x.detach().mean(-1, keepdim=True)).to(dtype)
