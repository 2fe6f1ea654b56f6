"""Fixtures shared by the test modules (helpers they import live in ``utils.py``)."""

from __future__ import annotations

import pytest
import torch

from fastvit import dispatch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Every fused backend counts as usable on CUDA tensors, so dispatch's selection for CUDA call signatures can
    be checked on a machine without a GPU (no kernel runs: only call signatures are asked about)."""
    real = dispatch.backend_unusable_reason

    def usable_on_cuda(backend, device):
        return None if device.type == "cuda" else real(backend, device)

    monkeypatch.setattr(dispatch, "backend_unusable_reason", usable_on_cuda)
    monkeypatch.setenv("FASTVIT_VERIFY", "off")  # coverage only; the evidence gate is test_verification.py's
    dispatch.clear_cache()
    yield
    monkeypatch.undo()
    dispatch.clear_cache()
