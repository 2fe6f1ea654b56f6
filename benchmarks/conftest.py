"""pytest-benchmark set-up for every suite: machine facts in the JSON; helpers live in ``benchmarks.harness``."""

from __future__ import annotations

import pytest

from benchmarks.harness import DEVICE, SMOKE, device_peaks, synchronized  # noqa: F401  (re-exported)


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    from benchmarks import harness

    machine_info.update(harness.machine_info())
    machine_info["peaks"] = device_peaks()


def pytest_report_header(config) -> str:
    mode = "smoke mode (no GPU: tiny shapes on CPU, numbers say nothing about GPUs)" if SMOKE else "GPU mode"
    return f"fastvit benchmarks: {DEVICE} - {mode}"


@pytest.fixture
def device():
    return DEVICE
