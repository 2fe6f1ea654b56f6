"""Shared test helpers: per-dtype tolerances, the flash-attention accuracy rule (``fastvit.accuracy``), the device and
skip reasons.

Imported by test modules as ``from utils import ...`` (pytest puts ``tests/`` on the path); fixtures live in
``conftest.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastvit.accuracy import (
    assert_within_torch_error,
    rounding_floor,
)  # the rule lives in the package: selftest uses it

# Plain comparisons (e.g. fastvit vs timm running the same math in the same dtype).
DTYPE_TOLS = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: this one's without the variables pytest-xdist sets in its workers (a
    child pytest would take itself for an xdist worker, and pytest-benchmark then turns itself off), plus
    ``overrides``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST_")}
    return {**env, **overrides}


def dtype_tols(dtype: torch.dtype) -> dict:
    return DTYPE_TOLS[dtype]


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# FASTVIT_NO_EXT=1 builds without the C++/CUDA extension on purpose: the extension's suites skip instead of failing.
EXTENSION_DISABLED = os.environ.get("FASTVIT_NO_EXT", "0") == "1"
needs_extension = pytest.mark.skipif(EXTENSION_DISABLED, reason="FASTVIT_NO_EXT=1: extension deliberately not built")


def triton_skip_reason() -> str | None:
    """Why Triton kernels cannot run in this process (None when they can: a GPU, or the interpreter)."""
    from fastvit import dispatch

    if DEVICE.type == "cpu" and not dispatch.triton_interpreter_enabled():
        return "no GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run here"
    return dispatch.backend_unusable_reason("triton", DEVICE)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def backend_skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on DEVICE tensors in this process (None when it can; ``torch`` always can)."""
    from fastvit import dispatch

    if backend == "triton":
        return triton_skip_reason()
    return dispatch.backend_unusable_reason(backend, DEVICE)


def needs_backend(backend: str) -> pytest.MarkDecorator:
    """Skip mark for a test that runs ``backend`` on DEVICE tensors."""
    reason = backend_skip_reason(backend)
    return pytest.mark.skipif(reason is not None, reason=str(reason))


# A model's ops on fused backends that run on CPU too (the Triton interpreter, the extension's C++ twin), and a
# tiny ViT whose head dim (32) the Triton kernels cover.
FUSED = {
    "patch_embed": "triton",
    "qkv_attention": "triton",
    "layer_norm": "cuda",
    "rms_norm": "cuda",
    "ln_linear": "triton",
    "linear_residual": "cuda",
    "ln_mlp": "cuda",
}
TINY = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=5)


def check_table_gradient(name, run, qkv, table) -> None:
    """A learned RoPE table's attention: ``run(backend, qkv, table)`` -> out (backend None: the fp64 spec). Out, grad
    qkv and grad table of the triton backend vs the fp64 spec, bounded by the torch backend's error in qkv's dtype
    (the table itself float32, as the models keep it)."""
    results = {}
    for backend in ("triton", "torch", None):
        dtype = torch.float64 if backend is None else qkv.dtype
        x = qkv.detach().to(dtype).requires_grad_(True)
        t = table.detach().to(torch.float64 if backend is None else torch.float32).requires_grad_(True)
        out = run(backend, x, t)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        results[backend] = (out.detach(), *torch.autograd.grad(out, (x, t), weights.to(out)))
    for label, mine, theirs, ref in zip(("out", "dqkv", "dtable"), *results.values()):
        assert mine.shape == ref.shape and torch.isfinite(mine).all(), (name, label)
        assert_within_torch_error(f"{name} {label}", mine, theirs, ref, floor=rounding_floor(ref, mine.dtype))
