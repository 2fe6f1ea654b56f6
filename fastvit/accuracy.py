"""The accuracy rule every fused kernel is held to, in one place: the test suite and ``fastvit selftest`` use it.

flash-attention's rule (``tests/test_flash_attn.py`` there): against an fp64 run of the spec
(``fastvit.reference``), a kernel's error may be at most ``factor`` (2) times PyTorch's own error for the same
computation in the same dtype, plus a ``floor`` for the cases where PyTorch happens to be (near) exact and the
bound would collapse to 0. Forward outputs and every gradient are checked the same way.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class ErrorCheck:
    """One tensor checked by :func:`check_within_torch_error`.

    Attributes:
        ours: max |ours - ref_fp64|.
        torch: max |torch_same_dtype - ref_fp64|, PyTorch's own error.
        bound: ``factor * torch + floor``.
    """

    ours: float
    torch: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.ours <= self.bound  # False for NaN

    @property
    def ratio(self) -> float:
        """ours / bound: at most 1 passes; NaN and Inf errors give inf."""
        if not self.ours <= self.bound and not self.ours > self.bound:  # NaN
            return float("inf")
        if self.bound > 0:
            return self.ours / self.bound
        return 0.0 if self.ours == 0 else float("inf")

    def __str__(self) -> str:
        return f"ours {self.ours:.3e}, torch {self.torch:.3e}, bound {self.bound:.3e}"


def max_abs_error(got: torch.Tensor, ref_fp64: torch.Tensor) -> float:
    """max |got - ref| in fp64 (0 for empty tensors; NaN when ``got`` has a NaN or Inf where ``ref`` is finite)."""
    if got.numel() == 0:
        return 0.0
    return (got.double() - ref_fp64).abs().max().item()


def check_within_torch_error(
    ours: torch.Tensor, torch_same_dtype: torch.Tensor, ref_fp64: torch.Tensor, factor: float = 2.0, floor: float = 0.0
) -> ErrorCheck:
    """Measure ``ours`` against the rule max|ours - ref| <= factor * max|torch_same_dtype - ref| + floor.

    Args:
        ours: the kernel's result.
        torch_same_dtype: PyTorch's result for the same inputs in the same dtype.
        ref_fp64: the spec run in fp64 (same shape).
        factor: allowed multiple of PyTorch's own error.
        floor: absolute allowance in the result's units (see :func:`rounding_floor`).
    """
    ours_err = max_abs_error(ours, ref_fp64)
    torch_err = max_abs_error(torch_same_dtype, ref_fp64)
    if not math.isfinite(torch_err) and bool(ref_fp64.isfinite().all()):
        # PyTorch's own answer overflowed where the exact one is finite (e.g. fp16 LayerNorm backward with
        # eps=1e-12 on a constant row: its rstd overflows fp16): its error measures nothing, the floor alone bounds.
        torch_err = 0.0
    return ErrorCheck(ours_err, torch_err, factor * torch_err + floor)


def assert_within_torch_error(
    name: str,
    ours: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    ref_fp64: torch.Tensor,
    factor: float = 2.0,
    floor: float = 0.0,
) -> None:
    """:func:`check_within_torch_error`, printing both errors, raising ``AssertionError`` when it fails.

    ``floor`` guards the case where PyTorch happens to be exact (e.g. fp64), in units of the output scale.
    """
    check = check_within_torch_error(ours, torch_same_dtype, ref_fp64, factor, floor)
    print(f"{name}: {check}")
    assert check.ok, f"{name}: error {check.ours:.3e} exceeds {factor} x torch's {check.torch:.3e} (+{floor:.1e})"


ACCUMULATION_NOISE_ULPS = 8  # ulps of the accumulation dtype allowed where the same-dtype PyTorch result is exact


def rounding_floor(ref_fp64: torch.Tensor, dtype: torch.dtype) -> float:
    """The floor of the rule for a result of ``dtype``: what no fp32-accumulating kernel can be asked to beat.

    Two terms, both at the result's scale ``m = max|ref|``: one rounding of the exact result to ``dtype`` (half
    an ulp, ``0.5 * eps(dtype) * m``: a sum PyTorch happens to round exactly may land one rounding away in ours),
    and a few ulps of the accumulation dtype (fp32, fp64 for fp64) at ``1 + m``: the kernels accumulate in fp32,
    and where the exact result is 0 (e.g. attention gradients with one token) PyTorch may return exactly 0 while
    an fp32 ``P * (dP - Delta)`` leaves cancellation noise at the scale of its O(1) terms (inputs are O(1)).
    """
    scale = ref_fp64.abs().max().item() if ref_fp64.numel() else 0.0
    accumulate = torch.promote_types(dtype, torch.float32)
    return 0.5 * torch.finfo(dtype).eps * scale + ACCUMULATION_NOISE_ULPS * torch.finfo(accumulate).eps * (1.0 + scale)
