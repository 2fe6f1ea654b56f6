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


def _rows(reference_infer: float, reference_train: float) -> list[dict]:
    timm_row = dict(name="timm eager", infer_img_s=1000.0, train_img_s=400.0)
    reference = dict(
        name="fastvit reference", infer_img_s=1000.0 * reference_infer, train_img_s=400.0 * reference_train
    )
    return [timm_row, reference, dict(name="fastvit auto", infer_img_s=990.0, train_img_s=401.0)]


@pytest.mark.parametrize(
    "ratios, expected",
    [
        ((1.07, 1.23), "the fastvit reference is 1.07x as fast as timm eager at inference and 1.23x as fast as it"),
        ((0.8, 0.5), "the fastvit reference is slower than (0.80x) timm eager at inference and slower than (0.50x) it"),
        ((1.01, 0.97), "is about as fast as (1.01x) timm eager at inference and about as fast as (0.97x) it"),
    ],
)
def test_demo_closing_text_follows_the_measured_numbers(ratios, expected):
    from fastvit.demo import closing_text

    text = " ".join(closing_text(_rows(*ratios), torch.device("cpu")))
    assert expected in text
    assert "'fastvit auto' runs the same PyTorch reference code as 'fastvit reference'" in text
    assert "No GPU here" not in " ".join(closing_text(_rows(*ratios), torch.device("cuda")))
