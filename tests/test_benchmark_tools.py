"""The benchmark harness, report and compare tools (benchmarks/): they render real runs and refuse bad comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import compare, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name, case, candidate, median, device="NVIDIA H100 80GB HBM3", **extra):
    return {
        "name": name,
        "fullname": f"benchmarks/test_x.py::{name}",
        "stats": {"median": median},
        "extra_info": dict(
            suite="model",
            case=case,
            candidate=candidate,
            items=256,
            item_name="img",
            flops=1e12,
            flop_floor_s=1e12 / 700e12,
            batch=256,
            model="vit_base",
            mode="inference",
            peaks={"matmul_tflops": 700.0, "copy_gbps": 3000.0, "matmul_dtype": "bfloat16"},
            **extra,
        ),
    }


def _run_json(device="NVIDIA H100 80GB HBM3", fused_median=0.05):
    return {
        "machine_info": {
            "device": device,
            "torch": "2.11",
            "peaks": {"matmul_tflops": 700.0, "copy_gbps": 3000.0, "matmul_dtype": "bfloat16"},
        },
        "datetime": "2026-11-25",
        "benchmarks": [
            _bench("eager", "vit_base infer b256", "timm eager", 0.10),
            _bench("compiled", "vit_base infer b256", "timm compile", 0.08),
            _bench("fused", "vit_base infer b256", "fastvit auto", fused_median),
        ],
    }


def test_report_table_speedups_and_roofline(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_run_json()))
    markdown, suites = report.render(report.load(str(path)), str(path))
    assert "| vit_base infer b256 | 2,560 | 3,200 | 5,120 (×2.00 / ×1.60) |" in markdown
    assert "| vit_base infer b256 | fastvit auto | 50.000 | 1.43 | – | 3% | 2.9% |" in markdown
    assert report.main([str(path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "run.md").exists()
    assert (tmp_path / "out" / "run-model-throughput.png").stat().st_size > 5_000
    assert (tmp_path / "out" / "run-model-speedup.png").stat().st_size > 5_000


def test_report_without_timings_says_so(tmp_path):
    data = _run_json()
    for bench in data["benchmarks"]:
        bench["stats"] = None
    markdown, _ = report.render(data, "x.json")
    assert "nothing to report" in markdown


def test_compare_flags_regressions_and_refuses_other_devices(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_run_json()))
    new.write_text(json.dumps(_run_json(fused_median=0.06)))
    assert compare.main([str(old), str(new), "--fail-on-regression"]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_run_json(device="NVIDIA A100-SXM4-80GB")))
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(old), str(other)])
    assert exit_info.value.code == 2
    assert "refusing to compare runs from different devices" in capsys.readouterr().err


def test_smoke_run_renders_end_to_end(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "benchmarks/test_bench_model.py",
            "--benchmark-enable",
            f"--benchmark-json={tmp_path / 'smoke.json'}",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    data = report.load(str(tmp_path / "smoke.json"))
    assert data["machine_info"]["git_commit"] and data["machine_info"]["peaks"]["matmul_tflops"] > 0
    markdown, _ = report.render(data, "smoke.json")
    assert "timm eager" in markdown and "fastvit auto" in markdown and "smoke mode" in markdown
