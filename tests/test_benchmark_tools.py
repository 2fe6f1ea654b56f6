"""The benchmark harness, report and compare tools (benchmarks/): they render real runs and refuse bad comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import compare, harness, report

from utils import child_env

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
        env=child_env(OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    data = report.load(str(tmp_path / "smoke.json"))
    assert data["machine_info"]["git_commit"] and data["machine_info"]["peaks"]["matmul_tflops"] > 0
    markdown, _ = report.render(data, "smoke.json")
    assert "timm eager" in markdown and "fastvit auto" in markdown and "smoke mode" in markdown


def _gemm_bench(suite, candidate, median, case, **extra):
    return {
        "name": case,
        "stats": {"median": median},
        "extra_info": dict(suite=suite, candidate=candidate, case=case, dtype="torch.bfloat16", **extra),
    }


def _gemm_run(triton_fwd_bwd=0.9, smoke=False):
    """ln_mlp at C=768 (two batches, both modes) and the block GEMMs' qkv/proj at C=768, Triton vs its alternative."""
    benches = []
    for batch in (32, 128):
        for mode, triton in (("fwd", 0.8), ("fwd+bwd", triton_fwd_bwd)):
            case = f"vit_base C768 b{batch} {mode}"
            shape = dict(width=768, hidden=3072, batch=batch, mode=mode)
            benches += [
                _gemm_bench("ln_mlp", "fastvit triton", triton, case, **shape),
                _gemm_bench("ln_mlp", "fastvit cuda", 1.0, case, **shape),
                _gemm_bench("ln_mlp", "torch eager", 0.5, case, **shape),
            ]  # not the alternative: ignored
    for gemm, n in (("qkv", 2304), ("proj", 768)):
        case = f"vit_base {gemm}"
        benches += [
            _gemm_bench("block_gemm", "fastvit triton", 0.5, case, gemm=gemm, k=768, n=n),
            _gemm_bench("block_gemm", "torch eager", 1.0, case, gemm=gemm, k=768, n=n),
        ]
    machine = {"device": "NVIDIA H200", "capability": "9.0", "smoke_mode": smoke}
    return {"machine_info": machine, "benchmarks": benches}


def test_gemm_choices_come_from_wins_in_every_case_and_merge_into_the_table(tmp_path, capsys):
    from benchmarks import gemm_choices

    wins, losses = gemm_choices.choices_from_run(_gemm_run(), "bench.json")
    assert {(e["op"], e["bucket"], e["dtype"], e["capability"], e["backend"]) for e in wins} == {
        ("ln_mlp", "768x3072", "bfloat16", "9.0", "triton"),
        ("ln_linear", "768x2304", "bfloat16", "9.0", "triton"),  # qkv only: proj has no LayerNorm prologue
    }
    assert losses == [] and "1.25x" in wins[1]["evidence"] + wins[0]["evidence"]
    # One case without a win (fwd+bwd 1.0x) and the bucket is not chosen; an earlier entry for it goes.
    wins, losses = gemm_choices.choices_from_run(_gemm_run(triton_fwd_bwd=1.0), "bench.json")
    assert [e["op"] for e in wins] == ["ln_linear"] and losses == [("ln_mlp", "768x3072", "bfloat16", "9.0")]
    other = dict(op="ln_mlp", bucket="1024x4096", dtype="bfloat16", capability="9.0", backend="triton", evidence="x")
    stale = dict(other, bucket="768x3072", variant="layer/gelu")
    table = tmp_path / "gemm_choices.json"
    table.write_text(json.dumps({"format": 1, "note": "n", "choices": [other, stale]}))
    results = tmp_path / "bench.json"
    results.write_text(json.dumps(_gemm_run(triton_fwd_bwd=1.0)))
    assert gemm_choices.main([str(results), "--write", "--table", str(table)]) == 0
    written = json.loads(table.read_text())
    assert written["note"] == "n" and [(e["op"], e["bucket"]) for e in written["choices"]] == [
        ("ln_mlp", "1024x4096"),
        ("ln_linear", "768x2304"),
    ]
    from fastvit import gemm_choices as shipped

    assert shipped.table.__wrapped__(table)[("ln_linear", "768x2304", "bfloat16", "9.0", "*")] == "triton"
    wins, _ = gemm_choices.choices_from_run(_gemm_run(), "bench.json")
    assert {e["op"]: e.get("variant") for e in wins} == {"ln_mlp": "layer/gelu", "ln_linear": None}  # as measured
    results.write_text(json.dumps(_gemm_run(smoke=True)))
    assert gemm_choices.main([str(results)]) == 2 and "not a GPU run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "profile, expected",
    [("full", ["a", "b", "c"]), ("headline", ["a", "b"]), ("families", ["c"])],
)
def test_profile_cases_cut_a_suite_to_its_round(monkeypatch, profile, expected):
    monkeypatch.setattr(harness, "SMOKE", False)
    monkeypatch.setattr(harness, "PROFILE", profile)
    cases = {"a": 1, "b": 2, "c": 3}
    assert list(harness.profile_cases(cases, ["a", "b"], families=["c"])) == expected
    assert harness.profile_cases(list(cases), ["a", "b"], families=["c"]) == expected
    # a suite without a families cut keeps its headline cases in the families round
    assert list(harness.profile_cases(cases, ["b"])) == (["a", "b", "c"] if profile == "full" else ["b"])


def test_profile_cases_refuse_a_case_the_suite_lacks_and_smoke_mode_keeps_everything(monkeypatch):
    monkeypatch.setattr(harness, "SMOKE", False)
    monkeypatch.setattr(harness, "PROFILE", "families")
    with pytest.raises(KeyError, match="families profile: \\['gone'\\]"):
        harness.profile_cases({"a": 1}, ["a"], families=["gone"])
    monkeypatch.setattr(harness, "SMOKE", True)
    assert harness.profile_cases({"a": 1, "b": 2}, ["a"], families=["b"]) == {"a": 1, "b": 2}
    monkeypatch.setenv("FASTVIT_BENCH_PROFILE", "everything")
    with pytest.raises(ValueError, match="FASTVIT_BENCH_PROFILE must be one of"):
        harness.bench_profile()


def test_the_measured_commit_is_named_without_a_repository(monkeypatch):
    # The GPU round's device copy has no .git: FASTVIT_COMMIT (exported by gpu_round.sh) names the commit, and git
    # failing there gives 'unknown', not an empty string.
    monkeypatch.setenv("FASTVIT_COMMIT", "abc123")
    assert harness._git_commit() == "abc123"
    monkeypatch.delenv("FASTVIT_COMMIT")
    no_repo = subprocess.CompletedProcess([], 128, stdout="", stderr="fatal: not a git repository")
    monkeypatch.setattr(harness.subprocess, "run", lambda *args, **kwargs: no_repo)
    assert harness._git_commit() == "unknown"


def test_the_rounds_of_the_environment_override_a_suites_own(monkeypatch):
    timed = []

    class Benchmark:
        def pedantic(self, fn, rounds, iterations, warmup_rounds):
            timed.append(rounds)

    monkeypatch.setenv("FASTVIT_BENCH_ROUNDS", "10")
    harness.run_benchmark(Benchmark(), lambda: None, warmup_rounds=0, rounds=30)
    monkeypatch.delenv("FASTVIT_BENCH_ROUNDS")
    harness.run_benchmark(Benchmark(), lambda: None, warmup_rounds=0, rounds=30)
    assert timed == [10, 30]
