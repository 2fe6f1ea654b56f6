"""Fixtures shared by the test modules (helpers they import live in ``utils.py``)."""

from __future__ import annotations

import os

import pytest
import torch

from fastvit import dispatch

# The tests run the fused kernels themselves (also under backend='auto' on a GPU): what this machine's selftest
# records say must not change them. The evidence gate has its own tests (test_verification.py turns it back on).
os.environ["FASTVIT_VERIFY"] = "off"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full precision for the test (GPU comparisons against the fp32 reference)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Every fused backend counts as usable on CUDA tensors, so dispatch's selection for CUDA call signatures can
    be checked on a machine without a GPU (no kernel runs: only call signatures are asked about)."""
    real = dispatch.backend_unusable_reason

    def usable_on_cuda(backend, device):
        return None if device.type == "cuda" else real(backend, device)

    monkeypatch.setattr(dispatch, "backend_unusable_reason", usable_on_cuda)
    dispatch.clear_cache()
    yield
    monkeypatch.undo()
    dispatch.clear_cache()
