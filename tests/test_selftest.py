"""``python -m fastvit selftest`` / ``fastvit.selftest()`` (``fastvit/selftest_runner.py``, ``selftest_cases.py``).

On CPU the whole tool runs under Triton's interpreter (the root conftest sets TRITON_INTERPRET=1 without a GPU)
and the extension's C++ twin: ``--quick`` end to end, the CLI, workers, and that a wrong kernel, an unwritten
output element or a store outside an output fails. The GPU-only parts (every autotune config of this GPU, the
heuristic's configs) are checked by listing them under a pretend GPU: the lists must hold every config the
launchers can pick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import tarfile

import pytest
import torch

import fastvit
from fastvit import accuracy, dispatch, ops, reference, selftest_cases, selftest_runner, verification
from fastvit.ops.triton import attention as attention_triton
from fastvit.ops.triton import attention_prologue, launch
from fastvit.ops.triton import patch_embed as patch_embed_triton

REPO = pathlib.Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The user's record cache and the shipped manifest under tmp_path."""
    monkeypatch.setenv("FASTVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verification, "MANIFEST_PATH", tmp_path / "manifest.json")
    verification.reload()
    yield tmp_path
    monkeypatch.undo()
    verification.reload()


def _usable_here() -> set[tuple[str, str]]:
    return {(op, b) for op, b in dispatch.fused_implementations() if dispatch.backend_unusable_reason(b, CPU) is None}


def _selftest(**kwargs) -> tuple[selftest_runner.SelftestReport, str]:
    out = io.StringIO()
    report = fastvit.selftest("cpu", quick=True, progress=False, stream=out, **kwargs)
    return report, out.getvalue()


def _needs_interpreter():
    if dispatch.backend_unusable_reason("triton", CPU) is not None:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")


# ------------------------------------------------------------------------------------------------
# End to end


def test_quick_selftest_runs_every_fused_op_on_cpu_and_records_the_verdicts(cache):
    report, table = _selftest(json_path=cache / "report.json")
    print(table)
    assert report.passed, table
    assert {(r.op, r.backend) for r in report.records} == _usable_here()
    for record in report.records:
        assert record.passed and record.quick and record.capability == "cpu" and record.checks > 0
        assert record.kernel_hash == verification.kernel_hash(record.op, record.backend)
        assert record.worst_ratio <= 1.0
    expected_dtypes = {"float32", "float16"}  # what the interpreter and the C++ twin both cover
    assert {r.dtype for r in report.records if r.op == "qkv_attention"} >= expected_dtypes & (
        {"float32", "float16"} if ("qkv_attention", "triton") in _usable_here() else set()
    )
    stored = verification.read_records(verification.cache_path())
    assert {r.key() for r in stored} == {r.key() for r in report.records}
    data = json.loads((cache / "report.json").read_text())
    assert data["passed"] and len(data["checks"]) == len(report.results)
    assert all(c["ratio"] <= 1.0 for c in data["checks"])
    labels = {c["label"] for c in data["checks"]}
    assert "deterministic mode, bitwise repeat" in labels  # bitwise repeat: attention, LN, ln_mlp, linear_residual
    for row in ("qkv_attention      triton  float32", "ln_mlp             cuda    float16", "PASSED"):
        assert row in table or ("qkv_attention", "triton") not in _usable_here()


def test_cli_with_worker_processes_exits_zero_and_writes_the_report(tmp_path):
    _needs_interpreter()
    environment = {**os.environ, "FASTVIT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fastvit", "selftest", "--quick", "--device", "cpu", "--no-progress", "--jobs"]
    command += ["2", "--ops", "layer_norm,patch_embed_uint8", "--json", str(tmp_path / "r.json")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "patch_embed_uint8  triton  float16" in result.stdout and "PASSED" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert {(r["op"], r["backend"]) for r in report["records"]} == {
        ("layer_norm", "cuda"),
        ("patch_embed_uint8", "triton"),
    }
    assert len(verification.read_records(tmp_path / "verified.json")) == len(report["records"])
    # the workers ran exactly the plan's checks, reported in the plan's order
    checks, _ = selftest_runner.plan(CPU, True, ["layer_norm", "patch_embed_uint8"])
    assert [(c["op"], c["label"]) for c in report["checks"]] == [(c.op, c.label) for c in checks]


def test_a_deadline_keeps_the_verdicts_of_the_groups_that_finished(cache, monkeypatch):
    # A time-boxed GPU round: past the deadline no check starts; the groups that finished are still recorded.
    ops = ["layer_norm", "rms_norm"]
    checks, _ = selftest_runner.plan(CPU, True, ops)
    first_rms = next(i for i, c in enumerate(checks) if c.op == "rms_norm")
    started = itertools.count()
    monkeypatch.setattr(selftest_runner, "_past", lambda stop_at: stop_at is not None and next(started) >= first_rms)
    report, table = _selftest(ops=ops, deadline=3600)
    assert not report.passed, table
    assert {r.op for r in report.records} == {"layer_norm"} and all(r.passed for r in report.records), table
    cut = [r for r in report.results if r.op == "rms_norm"]
    assert cut and all(r.detail == selftest_runner.NOT_RUN + selftest_runner.PAST_DEADLINE for r in cut)
    with pytest.raises(ValueError, match="deadline must be a positive number of seconds"):
        fastvit.selftest("cpu", quick=True, deadline=0)


def test_workers_are_stopped_at_the_deadline(tmp_path):
    environment = {**os.environ, "FASTVIT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fastvit", "selftest", "--quick", "--device", "cpu", "--no-progress", "--jobs"]
    command += ["2", "--ops", "layer_norm", "--deadline", "0.01", "--json", str(tmp_path / "r.json")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr  # not a pass: checks did not run
    details = [c["detail"] for c in json.loads((tmp_path / "r.json").read_text())["checks"]]
    cut = selftest_runner.NOT_RUN + selftest_runner.PAST_DEADLINE
    assert cut in details and all(d in ("", cut) for d in details), details


def test_on_cpu_without_the_interpreter_the_cli_runs_itself_again_with_it(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(selftest_runner.subprocess, "call", lambda command, env: calls.append((command, env)) or 7)
    assert selftest_runner.main(["--device", "cpu", "--quick"]) == 7  # the re-run's exit code
    ((command, env),) = calls
    assert command[1:] == ["-m", "fastvit", "selftest", "--device", "cpu", "--quick"]
    assert env["TRITON_INTERPRET"] == "1"


def test_bad_arguments_exit_2_with_the_reason(capsys):
    assert selftest_runner.main(["--device", "cpu", "--ops", "nonsense"]) == 2
    assert "unknown or unfused op(s) ['nonsense']" in capsys.readouterr().err
    assert selftest_runner.main(["--device", "cpu", "--jobs", "0"]) == 2
    assert "jobs must be a positive int" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device must be a CUDA device or 'cpu'"):
        fastvit.selftest("meta")


def test_info_reports_the_verification_settings(cache, capsys, monkeypatch):
    from fastvit.__main__ import info

    monkeypatch.delenv("FASTVIT_VERIFY")

    assert info([]) == 0
    out = capsys.readouterr().out
    assert "verification: FASTVIT_VERIFY=on" in out and str(verification.cache_path()) in out
    assert "shipped manifest:" in out


# ------------------------------------------------------------------------------------------------
# It catches what it is for


@pytest.fixture
def broken_attention(monkeypatch):
    """Replace the Triton attention forward launcher by ``make(real)`` where the custom ops call it."""
    real = attention_triton._attention_forward

    def install(make):
        for module in (attention_triton, attention_prologue):
            monkeypatch.setattr(module, "_attention_forward", make(real))

    return install


def _one_failure(report, op="attention"):
    failed = [r for r in report.records if not r.passed]
    assert failed and {r.op for r in failed} == {op}, [str(r) for r in report.records]
    return failed


def test_a_wrong_kernel_fails_and_is_recorded_as_failed(cache, broken_attention):
    _needs_interpreter()

    def make(real):
        def wrong(q, k, v, out, lse, scale, *args, **kwargs):
            real(q, k, v, out, lse, scale, *args, **kwargs)
            out.mul_(1.001)  # 0.1% off: far above PyTorch's own error

        return wrong

    broken_attention(make)
    report, table = _selftest(ops=["attention"])
    assert not report.passed and "FAIL triton attention" in table and table.rstrip().endswith("FAILED")
    failed = _one_failure(report)
    assert all("out: ours" in r.detail for r in failed)
    evidence = verification.read_records(verification.cache_path())
    assert evidence and not any(r.passed for r in evidence)


def test_an_unwritten_output_element_fails(cache, broken_attention):
    _needs_interpreter()

    def make(real):
        def partial(q, k, v, out, lse, scale, *args, **kwargs):
            scratch = torch.empty_like(out)
            real(q, k, v, scratch, lse, scale, *args, **kwargs)
            out[..., :-1, :].copy_(scratch[..., :-1, :])  # the last query row is never written

        return partial

    broken_attention(make)
    report, _ = _selftest(ops=["attention"], record=False)
    assert not report.passed
    assert all(r.ratio == math.inf for r in report.results)


def test_a_store_outside_an_output_fails(cache, broken_attention):
    _needs_interpreter()

    def make(real):
        def stray(q, k, v, out, lse, scale, *args, **kwargs):
            real(q, k, v, out, lse, scale, *args, **kwargs)
            lse.as_strided((1,), (1,), lse.storage_offset() + lse.numel()).fill_(0.0)  # one past the end

        return stray

    broken_attention(make)
    report, _ = _selftest(ops=["attention"], record=False)
    assert not report.passed
    assert all("a store outside" in r.detail for r in report.results)


def test_a_crash_is_a_failure_of_that_check(cache, monkeypatch):
    def crash(*args):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(selftest_cases, "CASE_BUILDERS", {**selftest_cases.CASE_BUILDERS})
    real = selftest_cases.extension_checks

    def builder(op, device, quick):
        checks = real(op, device, quick)
        return [checks[0].__class__(**{**checks[0].__dict__, "run": crash}), *checks[1:]]

    monkeypatch.setitem(selftest_cases.CASE_BUILDERS, ("layer_norm", "cuda"), builder)
    report, table = _selftest(ops=["layer_norm"], record=False)
    assert not report.passed and "RuntimeError: simulated launch failure" in table
    assert sum(not r.passed for r in report.results) == 1


# ------------------------------------------------------------------------------------------------
# Every config the launchers may pick on a GPU is checked


@pytest.fixture
def pretend_gpu_launch(monkeypatch):
    """The Triton launchers believe they compile for a GPU with 132 SMs (only config lists are asked about)."""
    monkeypatch.setattr(launch, "on_gpu", lambda tensor: True)
    monkeypatch.setattr(launch, "num_sms", lambda index: 132)
    return monkeypatch


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_attention_sweep_forces_every_autotune_candidate(pretend_gpu_launch, arch, dtype):
    pretend_gpu_launch.setattr(launch, "gpu_arch", lambda tensor: arch)
    elem = torch.finfo(dtype).bits // 8
    for head_dim in attention_triton.SUPPORTED_HEAD_DIMS:
        sweep = selftest_cases._attention_config_sweep(CPU, dtype, head_dim)
        block_d = attention_triton._block_d(head_dim)
        for kind in ("fwd", "dkdv", "dq"):
            wanted = attention_triton.candidate_configs(kind, arch, block_d, elem)
            assert {configs[kind] for configs in sweep} == set(wanted), (kind, head_dim)
        assert len(sweep) == max(len(attention_triton.candidate_configs(k, arch, block_d, elem)) for k in sweep[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_patch_embed_candidates_hold_every_choice_of_the_heuristic(pretend_gpu_launch, dtype):
    like = torch.empty(0)
    candidates = {kind: patch_embed_triton.candidate_configs(kind, like, dtype) for kind in ("fwd", "bwd_input")}
    # Wide gathers: 2 row tiles x 4 column tiles x 3 (fp32: 2) K tiles. Narrow gathers (channels_last, patch rows
    # not a multiple of 8) run 8 warps, the forward's K tile at most 32 at 128 rows: 12 (8) new 64-row tiles and 6
    # new 128-row ones (the 8-warp 128x128 tiles are shared).
    assert len(candidates["fwd"]) == (24 + 18 if dtype != torch.float32 else 16 + 14)
    rng = random.Random(0)
    for _ in range(2000):
        rows, cols, red = rng.randint(1, 10**6), rng.randint(1, 5000), rng.randint(1, 10**4)
        for kind, narrow_gather in itertools.product(("fwd", "bwd_input"), (False, True)):
            config = patch_embed_triton.heuristic_config(kind, like, dtype, rows, cols, red, narrow_gather)
            assert config in candidates[kind], (kind, narrow_gather, rows, cols, red)


def test_the_plan_covers_every_fused_implementation_with_forced_configs_on_a_gpu(pretend_gpu_launch):
    pretend_gpu_launch.setattr(launch, "gpu_arch", lambda tensor: 90)
    assert set(selftest_cases.CASE_BUILDERS) == set(dispatch.fused_implementations())
    checks = selftest_cases.build_checks("qkv_attention", "triton", CPU, quick=False)
    forced = {c for check in checks for c in check.configs}
    for dtype in (torch.float16, torch.float32):
        for head_dim in attention_triton.SUPPORTED_HEAD_DIMS:
            block_d = attention_triton._block_d(head_dim)
            for kind in ("fwd", "dkdv", "dq"):
                for config in attention_triton.candidate_configs(kind, 90, block_d, dtype.itemsize):
                    assert f"{kind}={config}" in forced
    labels = [c.label for c in checks]
    assert any("tf32" in label for label in labels) and any("(autotuned)" in label for label in labels)
    # the qk-norm / RoPE prologue's own candidate lists (sm_90), padded and packed: every config forced too
    varlen = selftest_cases.build_checks("varlen_qkv_attention", "triton", CPU, quick=False)
    for plan in (checks, varlen):
        sixteen_bit = {c.dtype for c in plan if "prologue" in c.label} & {torch.float16, torch.bfloat16}
        assert sixteen_bit
        for dtype in sixteen_bit:
            forced = {c for check in plan if check.dtype == dtype and "prologue" in check.label for c in check.configs}
            for kind in ("fwd", "dkdv", "dq"):
                for config in attention_triton.candidate_configs(kind, 90, 64, 2, rope=True, prologue=True):
                    assert f"{kind}={config}" in forced, (kind, config, dtype)
    pe = selftest_cases.build_checks("patch_embed", "triton", CPU, quick=False)
    assert len({c for check in pe for c in check.configs if c.startswith("fwd=")}) == 42  # float16: every config


def test_a_forced_config_spans_the_backward_kernels_too():
    # The backward kernels launch in torch.autograd.grad, after the fused call has returned: a forced config must
    # still be in force there, else the sweep of dK/dV and dQ configs checks the autotuner's choice instead.
    forcing, seen = [], []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", bool(forcing)))
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", bool(forcing)))
            return 2 * grad

    @contextlib.contextmanager
    def force():
        forcing.append(True)
        try:
            yield
        finally:
            forcing.pop()

    case = selftest_cases.OpCase(
        fused=Probe.apply,
        peer=lambda x: 2 * x,
        spec=lambda x: 2 * x,
        make=lambda gen: [torch.randn(4, generator=gen, dtype=torch.float64)],
        names=("out", "grad x"),
    )
    outcome = selftest_cases.measure(selftest_cases._forced(case, force), torch.float32, CPU, seed=0)
    assert outcome.ratio <= 1.0 and seen[:2] == [("forward", True), ("backward", True)], (outcome, seen)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_the_plan_checks_the_prologue_on_packed_sequences_and_under_a_key_padding_mask(quick):
    # GPU evidence for varlen + prologue and key-padding mask + prologue: every covered dtype, both RoPE layouts and
    # norm kinds between them (quick) or each (full).
    varlen = selftest_cases.build_checks("varlen_qkv_attention", "triton", CPU, quick=quick)
    padded = selftest_cases.build_checks("qkv_attention", "triton", CPU, quick=quick)
    packed_prologue = [c for c in varlen if "prologue" in c.label]
    masked_prologue = [c for c in padded if "prologue" in c.label and "key-padding mask" in c.label]
    dtypes = {c.dtype for c in varlen}
    assert dtypes and {c.dtype for c in packed_prologue} == dtypes == {c.dtype for c in masked_prologue}
    assert any("(5, 0, 1, 70)" in c.label for c in packed_prologue)  # empty, length-1 and multi-block sequences
    for prologue in ("layer-norm + RoPE interleaved", "rms-norm + RoPE half"):
        assert any(prologue in c.label for c in packed_prologue + masked_prologue)
        if not quick:
            assert any(prologue in c.label for c in packed_prologue) and any(
                prologue in c.label for c in masked_prologue
            )
    per_dtype = len(packed_prologue + masked_prologue) / len(dtypes)
    assert per_dtype == (2 if quick else 6)


def test_a_wrong_packed_rope_table_or_an_ignored_mask_fails_the_prologue_checks():
    _needs_interpreter()
    prologue = selftest_cases._Prologue(1, "interleaved", "layer")
    case = selftest_cases._varlen_case((5, 0, 1, 30), 2, 32, prologue)
    assert selftest_cases.measure(case, torch.float32, CPU, seed=3).passed
    swapped = selftest_cases._varlen_rope_table((5, 0, 30, 1), prologue, 32)  # the last two sequences' rows swapped

    def wrong_table(qkv, cu, *params):
        return ops.varlen_qkv_attention(qkv, cu, 30, 2, backend="triton", **prologue.kwargs(swapped, params))

    outcome = selftest_cases.measure(dataclasses.replace(case, fused=wrong_table), torch.float32, CPU, seed=3)
    assert not outcome.passed, outcome
    masked = selftest_cases._prologue_qkv_case((3, 4), 2, 32, selftest_cases._Prologue(1, "half", "rms"), True)
    unmasked = dataclasses.replace(masked, fused=lambda qkv, keep, *p: masked.fused(qkv, torch.ones_like(keep), *p))
    assert selftest_cases.measure(masked, torch.float32, CPU, seed=4).passed
    outcome = selftest_cases.measure(unmasked, torch.float32, CPU, seed=4)
    assert not outcome.passed, outcome


def test_the_learned_per_head_table_check_is_planned_and_catches_a_missing_table_gradient():
    # RoPE-Mixed on a GPU: every covered dtype gets the per-head learned-table check, and a fused path that drops
    # the table's gradient (or shares one head's table) fails it.
    planned = selftest_cases.build_checks("qkv_attention", "triton", CPU, quick=True)
    learned = [c for c in planned if "learned per-head tables" in c.label]
    assert learned and {c.dtype for c in learned} == {c.dtype for c in planned}
    _needs_interpreter()
    case = selftest_cases._learned_table_case((3, 4), 2, 32, selftest_cases._Prologue(1, "half", "rms"))
    assert selftest_cases.measure(case, torch.float32, CPU, seed=5).passed

    def no_table_gradient(qkv, table, *params):  # the values, a zero gradient
        return case.fused(qkv, table.detach() + 0.0 * table, *params)

    def one_table(qkv, table, *params):
        return case.fused(qkv, table[:1].expand_as(table), *params)

    for wrong in (no_table_gradient, one_table):
        outcome = selftest_cases.measure(dataclasses.replace(case, fused=wrong), torch.float32, CPU, seed=5)
        assert not outcome.passed, (wrong.__name__, outcome)


def test_forced_configs_reach_the_attention_launch(monkeypatch):
    _needs_interpreter()
    kernels = launch.kernels("attention")
    real, seen = kernels.attn_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
                return real[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(kernels, "attn_fwd_kernel", Spy())
    qkv = torch.randn(1, 40, 3 * 2 * 32)
    with attention_triton.forced_configs({"fwd": (16, 32, 4, 2)}):
        forced = ops.qkv_attention(qkv, 2, backend="triton")
    ops.qkv_attention(qkv, 2, backend="triton")
    assert seen == [(16, 32), tuple(kernels.INTERPRETER_CONFIGS["fwd"][:2])]
    torch.testing.assert_close(forced, reference.qkv_attention(qkv, 2), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown kernel kind"), attention_triton.forced_configs({"bwd": (1, 1, 1, 1)}):
        pass
    with pytest.raises(ValueError, match="positive ints"), attention_triton.forced_configs({"fwd": (16, 0, 4, 2)}):
        pass
    with pytest.raises(ValueError, match="unknown kernel kind"), patch_embed_triton.forced_configs({"x": {}}):
        pass


def test_forced_patch_embed_configs_are_restored_after_the_block():
    before = {k: dict(v) for k, v in patch_embed_triton.CONFIG_OVERRIDES.items()}
    with patch_embed_triton.forced_configs({"fwd": {"BLOCK_R": 16}, "bwd_weight": {"split": 3}}):
        assert patch_embed_triton.CONFIG_OVERRIDES["fwd"]["BLOCK_R"] == 16
    assert before == patch_embed_triton.CONFIG_OVERRIDES


# ------------------------------------------------------------------------------------------------
# The shipped manifest and the accuracy rule


def test_the_manifest_takes_full_gpu_runs_and_drops_retired_kernel_sources(cache, monkeypatch):
    monkeypatch.setattr(verification, "device_facts", lambda d: verification.DeviceFacts("9.0", "NVIDIA H200"))
    cuda = torch.device("cuda")
    current = verification.new_record("ln_mlp", "cuda", cuda, torch.bfloat16, True)
    retired = verification.Record(**{**current.__dict__, "kernel_hash": "0" * 16, "dtype": "float16"})
    verification.write_records(verification.MANIFEST_PATH, [retired])
    new = verification.new_record("qkv_attention", "triton", cuda, torch.bfloat16, True)
    assert "not written" in selftest_runner._write_manifest([new], cuda, quick=True)
    assert "not written" in selftest_runner._write_manifest([new], CPU, quick=False)
    assert "merged 2 verdicts" in selftest_runner._write_manifest([new, current], cuda, quick=False)
    kept = verification.read_records(verification.MANIFEST_PATH)
    assert {r.key() for r in kept} == {new.key(), current.key()}


def test_the_accuracy_rule():
    ref = torch.tensor([1.0, -2.0], dtype=torch.float64)
    close = accuracy.check_within_torch_error(ref.float() + 1e-6, ref.float() + 1e-6, ref)
    assert close.ok and close.ratio == pytest.approx(0.5, rel=1e-3)
    nan = accuracy.check_within_torch_error(torch.tensor([float("nan"), 0.0]), ref.float(), ref)
    assert not nan.ok and nan.ratio == math.inf
    exact = accuracy.check_within_torch_error(ref.float(), ref.float(), ref)
    assert exact.ok and exact.ratio == 0.0
    empty = torch.empty(0, dtype=torch.float64)
    assert accuracy.check_within_torch_error(empty.float(), empty.float(), empty).ok
    # the floor: half an ulp of the dtype at the result's scale, plus 8 fp32 ulps at 1 + scale
    half_ulp = 0.5 * torch.finfo(torch.float16).eps * 2.0
    assert accuracy.rounding_floor(ref, torch.float16) == pytest.approx(half_ulp + 8 * 2**-23 * 3.0)
    assert accuracy.rounding_floor(ref, torch.float64) < 1e-14  # fp64 results accumulate in fp64
    with pytest.raises(AssertionError, match="exceeds 2.0 x torch's"):
        accuracy.assert_within_torch_error("x", ref.float() + 1.0, ref.float(), ref)


# ------------------------------------------------------------------------------------------------
# The GPU round (benchmarks/gpu_round.sh) fits its budget by construction


def _round(tmp_path, *args, python_body="exit 0"):
    """Run the round script with a stand-in python (the orchestration only: nothing is built or measured)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "fake python $*"\n{python_body}\n')
    fake.chmod(0o755)
    environment = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "FASTVIT_COMMIT": "abc123"}
    command = ["bash", str(REPO / "benchmarks" / "gpu_round.sh"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)


def test_the_round_plan_fits_eight_minutes():
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_round.sh"), "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in ("build", "selftest --write-manifest", "gpu and not slow", "compute-sanitizer", "headline"):
        assert step in out, step
    total = int(out.split("estimated total: ")[1].split(" s")[0])
    assert total <= 480 and "fits: yes" in out
    tight = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_round.sh"), "--dry-run", "--budget", "300"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert tight.returncode == 1 and "fits: NO" in tight.stdout


def test_the_round_packs_at_most_eight_files_and_names_the_commit(tmp_path):
    result = _round(tmp_path, "--budget", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and "summary.txt" in files and "round.tar.gz" in files
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "commit abc123" in summary
    for step in ("facts", "build", "selftest", "gpu-tests", "sanitizer", "bench-ops", "bench-model"):
        assert f"\n{step} " in summary, step


def test_the_families_round_measures_the_goals_within_eight_minutes(tmp_path):
    plan = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_round.sh"), "--dry-run", "--profile", "families"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert plan.returncode == 0 and "fits: yes" in plan.stdout, plan.stdout + plan.stderr
    assert int(plan.stdout.split("estimated total: ")[1].split(" s")[0]) <= 480
    for step in ("selftest --write-manifest", "FASTVIT_BENCH_PROFILE=families", "bench-attn", "bench-model"):
        assert step in plan.stdout, step
    assert "gpu and not slow" not in plan.stdout  # the headline round runs the GPU tests
    result = _round(tmp_path, "--budget", "200", "--profile", "families")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "GPU round (families)" in summary
    for step in ("facts", "build", "selftest", "bench-attn", "bench-model"):
        assert f"\n{step} " in summary, step
    bad = _round(tmp_path, "--profile", "everything")
    assert bad.returncode == 2 and "--profile must be headline or families" in bad.stderr


def test_a_step_cut_at_its_limit_is_interrupted_so_that_pytest_can_save_its_results(tmp_path):
    # SIGINT (pytest ends its session and pytest-benchmark writes the JSON of what finished), not SIGTERM.
    body = 'case "$*" in *pip*) trap "echo stopped by SIGINT; exit 130" INT; sleep 60 & wait ;; esac'
    result = _round(tmp_path, "--budget", "65", python_body=body)  # deadline 20 s: the build step is cut there
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert re.search(r"\nbuild +124 ", summary) and int(summary.split("total ")[1].split(" s")[0]) <= 65, summary
    with tarfile.open(tmp_path / "out" / "round.tar.gz") as packed:
        log = packed.extractfile("./logs/build.log").read().decode()
    assert "stopped by SIGINT" in log, log
    assert result.returncode != 0


def test_a_slow_round_is_cut_at_its_deadline(tmp_path):
    result = _round(tmp_path, "--budget", "60", python_body="sleep 4")  # deadline 20 s: the build alone takes 8
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "skipped:" in summary and "left before the deadline" in summary, summary
    seconds = int(summary.split("total ")[1].split(" s")[0])
    assert seconds <= 60
    assert result.returncode != 0  # the selftest never ran: the round did not pass


def test_after_a_broken_cuda_context_the_rest_is_not_run_and_not_recorded(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(verification, "device_facts", lambda d: verification.DeviceFacts("9.0", "NVIDIA H200"))

    def fine():
        return selftest_cases.Outcome(0.5, "out: fine")

    def illegal_address():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    Check = selftest_cases.Check
    checks = [
        Check("ln_mlp", "cuda", torch.float16, "first", fine),
        Check("qkv_attention", "triton", torch.float16, "breaks", illegal_address),
        Check("qkv_attention", "triton", torch.float16, "after", fine),
        Check("layer_norm", "cuda", torch.float16, "after", fine),
    ]
    with selftest_runner._progress(len(checks), enabled=False) as bar:
        results = selftest_runner._run_in_process(checks, torch.device("cuda"), bar)
    assert [r.passed for r in results] == [True, False, False, False]
    assert results[3].detail == "not run: the CUDA context broke in qkv_attention [breaks]"
    records = selftest_runner._records(results, torch.device("cuda"), quick=False)
    verdicts = {(r.op, r.passed) for r in records}
    assert verdicts == {("ln_mlp", True), ("qkv_attention", False)}  # layer_norm: no evidence either way
    report = selftest_runner.SelftestReport("cuda", "NVIDIA H200", False, 1.0, results, records, {})
    table = selftest_runner.format_report(report)
    assert ["layer_norm", "cuda", "float16", "1", "-", "0.000", "not", "run"] in [
        line.split() for line in table.splitlines()
    ]
    assert "2 checks not run" in table and "FAIL triton qkv_attention float16 [breaks]" in table
