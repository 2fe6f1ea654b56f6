"""pytest-benchmark setup shared by the suites: device choice, CUDA-synchronised callables, metadata."""

from __future__ import annotations

import platform
import subprocess

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronized(fn):
    """Wrap ``fn`` so that each timed call waits for the GPU to finish (no-op on CPU)."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastvit

    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor()
    machine_info["fastvit"] = fastvit.__version__
    machine_info["git_commit"] = _git_commit()
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None


@pytest.fixture
def device() -> torch.device:
    return DEVICE
