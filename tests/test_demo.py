"""The demo, the main job on the embedded default: trains on the bundled digits to >= 95% and saves its outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fastvit
from fastvit.data import digits_tensors, random_shift

pytest.importorskip("sklearn")


def test_digits_data_shapes_and_split():
    train_x, train_y, test_x, test_y, mean, std = digits_tensors(32)
    assert train_x.shape == (1437, 1, 32, 32) and test_x.shape == (360, 1, 32, 32)
    assert set(train_y.tolist()) == set(range(10)) and set(test_y.tolist()) == set(range(10))
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-4
    assert 0 < mean < 1 and 0 < std < 1
    shifted = random_shift(train_x[:8], 2)
    assert shifted.shape == train_x[:8].shape and not shifted.equal(train_x[:8])
    assert random_shift(train_x[:8], 0).equal(train_x[:8])


def test_demo_default_reaches_target_and_writes_outputs(tmp_path):
    # The README's demo command, with its defaults (only the output directory and timing budget changed).
    result = subprocess.run(
        [sys.executable, "-m", "fastvit", "demo", "--output", str(tmp_path), "--bench-seconds", "0.2", "--quiet"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["test_accuracy"] >= 0.95
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert len(history) == 30 and history[-1]["test_top1"] == summary["test_accuracy"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    model = fastvit.load_weights(
        fastvit.create_model("vit_digits_patch4_32"), tmp_path / "checkpoint" / "model.safetensors"
    )
    assert model.num_classes == 10
    names = [row["name"] for row in summary["throughput"]]
    assert "fastvit reference" in names and "fastvit auto" in names
    assert "| implementation" in result.stdout
    if not torch.cuda.is_available():
        assert "No GPU here" in result.stdout  # the table says plainly that no fused kernel ran


def test_info_command_reports_backends():
    result = subprocess.run([sys.executable, "-m", "fastvit", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch   yes" in result.stdout and "triton" in result.stdout and "cuda" in result.stdout
