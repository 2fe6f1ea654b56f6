"""``python -m fastvit selftest`` / ``fastvit.selftest()``: check every fused kernel on this device, record it.

Runs the checks of ``fastvit.selftest_cases`` for every fused (op, backend) that can run on the device, prints a
table (op, backend, dtype, checks, distinct kernel configs, worst error / bound, result) behind a progress bar,
and records one verdict per (op, backend, dtype) in the user's cache (``fastvit.verification``), which is what
lets ``backend='auto'`` use the fused kernels on this GPU. Exits non-zero when any check fails.

On a GPU most of the time goes into compiling Triton kernels (one per config, head dim and dtype), which is
serial within a process: ``--jobs N`` spreads the checks over N worker processes sharing Triton's on-disk cache.
A worker whose CUDA context breaks (an illegal memory access poisons the process) is replaced, and the check it
was running fails; the other checks still run in a fresh context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastvit import dispatch, verification

PROG = "python -m fastvit selftest"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check's verdict: ``ratio`` = worst error / bound (<= 1 passes)."""

    op: str
    backend: str
    dtype: str
    label: str
    configs: tuple[str, ...]
    ratio: float
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0


@dataclasses.dataclass
class SelftestReport:
    """Everything one selftest did: per-check results, one record per (op, backend, dtype), what was skipped."""

    device: str
    device_name: str
    quick: bool
    seconds: float
    results: list[CheckResult]
    records: list[verification.Record]
    skipped: dict[str, str]  # 'backend op' -> why it cannot run here

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "device_name": self.device_name,
            "quick": self.quick,
            "seconds": round(self.seconds, 2),
            "passed": self.passed,
            "torch": torch.__version__,
            "triton": verification.triton_version(),
            "records": [r.to_json() for r in self.records],
            "skipped": self.skipped,
            "checks": [
                {**dataclasses.asdict(r), "ratio": r.ratio if math.isfinite(r.ratio) else "inf"} for r in self.results
            ],
        }


def plan(device: torch.device, quick: bool, ops: list[str] | None = None):
    """(checks, skipped): every check of the fused (op, backend) pairs that can run on ``device``, in a fixed
    order (workers rebuild the same list and run the indices they are given), and why the others are skipped."""
    from fastvit import selftest_cases

    checks, skipped = [], {}
    for op, backend in dispatch.fused_implementations():
        if ops and op not in ops:
            continue
        why = dispatch.backend_unusable_reason(backend, device)
        if why is not None:
            skipped[f"{backend} {op}"] = why
            continue
        checks += selftest_cases.build_checks(op, backend, device, quick)
    return checks, skipped


def _run_one(check, device: torch.device) -> CheckResult:
    from fastvit.selftest_cases import Outcome

    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        outcome = check.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous kernel error belongs to this check
    except Exception as exc:  # a crash is a failure of this check, reported with the error
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        outcome = Outcome(math.inf, f"{type(exc).__name__}: {message}")
    seconds = time.perf_counter() - start
    dtype = str(check.dtype).removeprefix("torch.")
    return CheckResult(
        check.op, check.backend, dtype, check.label, check.configs, outcome.ratio, outcome.detail, seconds
    )


_CONTEXT_ERRORS = ("CUDA error", "Triton Error [CUDA]", "AcceleratorError", "illegal memory access", "launch failure")
NOT_RUN = "not run: "  # the detail of a check skipped after an earlier one broke the CUDA context
PAST_DEADLINE = "the selftest's deadline passed"


def _not_run(check, why: str) -> CheckResult:
    dtype = str(check.dtype).removeprefix("torch.")
    return CheckResult(check.op, check.backend, dtype, check.label, check.configs, math.inf, NOT_RUN + why, 0.0)


def _broken_context(result: CheckResult) -> bool:
    """True when the check's failure leaves the process's CUDA context unusable (e.g. an illegal address)."""
    return any(marker in result.detail for marker in _CONTEXT_ERRORS)


def _past(stop_at: float | None) -> bool:
    return stop_at is not None and time.monotonic() >= stop_at


def _run_in_process(checks, device: torch.device, bar, stop_at: float | None = None) -> list[CheckResult]:
    """Run ``checks`` here, one after the other; after a check breaks the CUDA context the rest cannot run in
    this process and are reported as not run (``--jobs 2`` and more restart them in a fresh process); so are the
    checks not started by ``stop_at`` (``time.monotonic()``; see ``selftest``'s ``deadline``)."""
    results, broken = [], None
    for check in checks:
        bar.set_postfix_str(f"{check.op} {str(check.dtype).removeprefix('torch.')}", refresh=False)
        if _past(stop_at):
            results.append(_not_run(check, PAST_DEADLINE))
        elif broken is None:
            results.append(_run_one(check, device))
            if device.type == "cuda" and _broken_context(results[-1]):
                broken = f"{results[-1].op} [{results[-1].label}]"
        else:
            results.append(_not_run(check, f"the CUDA context broke in {broken}"))
        bar.update(1)
    return results


# ----------------------------------------------------------------------------------------------
# Worker processes


def _result_to_json(index: int, result: CheckResult) -> str:
    data = dataclasses.asdict(result)
    data["ratio"] = result.ratio if math.isfinite(result.ratio) else "inf"
    return json.dumps({"index": index, **data})


def _result_from_json(line: str) -> tuple[int, CheckResult]:
    data = json.loads(line)
    index = data.pop("index")
    data["ratio"] = math.inf if data["ratio"] == "inf" else data["ratio"]
    data["configs"] = tuple(data["configs"])
    return index, CheckResult(**data)


def _worker(args) -> int:
    """Run the checks listed in ``args.worker`` (a JSON file of indices), one JSON line each into ``args.results``."""
    device = torch.device(args.device)
    checks, _ = plan(device, args.quick, args.ops)
    indices = json.loads(Path(args.worker).read_text())
    with open(args.results, "a") as out:
        for index in indices:
            result = _run_one(checks[index], device)
            out.write(_result_to_json(index, result) + "\n")
            out.flush()
            if device.type == "cuda" and _broken_context(result):
                return 3  # the context is gone: the parent restarts the remaining checks in a fresh process
    return 0


def _run_in_workers(
    checks, device: torch.device, quick: bool, ops, jobs: int, bar, stop_at: float | None = None
) -> dict[int, CheckResult]:
    """Run ``checks`` in ``jobs`` worker processes (round robin: each walks the plan in order, op by op), replacing
    a worker that dies. At ``stop_at`` the workers are stopped and what they did not report is not run."""
    results: dict[int, CheckResult] = {}
    with tempfile.TemporaryDirectory(prefix="fastvit-selftest-") as tmp:
        pending = [list(range(start, len(checks), jobs)) for start in range(jobs)]
        running, spawned = [], 0

        def spawn(indices):
            nonlocal spawned
            spawned += 1
            shard, out = Path(tmp) / f"shard{spawned}.json", Path(tmp) / f"results{spawned}.jsonl"
            shard.write_text(json.dumps(indices))
            out.touch()
            command = [sys.executable, "-m", "fastvit", "selftest", "--worker", str(shard), "--results", str(out)]
            command += ["--device", str(device)] + (["--quick"] if quick else [])
            command += ["--ops", ",".join(ops)] if ops else []
            log = Path(tmp) / f"stderr{spawned}.log"
            with open(log, "w") as errors:  # a file, not a pipe: a full pipe would block the worker
                process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
            running.append((process, indices, out, log))

        for indices in pending:
            if indices:
                spawn(indices)
        while running:
            time.sleep(0.2)
            out_of_time = _past(stop_at)
            for process, indices, out, log in list(running):
                if out_of_time and process.poll() is None:
                    process.kill()
                    process.wait()
                for line in out.read_text().split("\n")[:-1]:  # whole lines: a killed worker may leave half a one
                    index, result = _result_from_json(line)
                    if index not in results:
                        results[index] = result
                        bar.update(1)
                if process.poll() is None:
                    continue
                running.remove((process, indices, out, log))
                left = [i for i in indices if i not in results]
                if out_of_time:
                    for index in left:
                        results[index] = _not_run(checks[index], PAST_DEADLINE)
                        bar.update(1)
                    continue
                if left and process.returncode not in (0, 3):  # died inside a check without reporting it
                    last_line = (log.read_text().strip().splitlines() or [""])[-1][:200]
                    why = f"worker exited with code {process.returncode} during this check ({last_line})"
                    crashed = checks[left[0]]
                    dtype = str(crashed.dtype).removeprefix("torch.")
                    results[left[0]] = CheckResult(
                        crashed.op, crashed.backend, dtype, crashed.label, crashed.configs, math.inf, why, 0.0
                    )
                    bar.update(1)
                    left = left[1:]
                if left:
                    spawn(left)
    return results


# ----------------------------------------------------------------------------------------------
# The selftest


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="selftest", unit="check", disable=not enabled, file=sys.stderr, leave=False)


def _records(results: list[CheckResult], device: torch.device, quick: bool) -> list[verification.Record]:
    """One verdict per (op, backend, dtype); none for a group with checks that could not run and no failure of
    its own (no evidence either way)."""
    groups: dict[tuple[str, str, str], list[CheckResult]] = {}
    for result in results:
        groups.setdefault((result.op, result.backend, result.dtype), []).append(result)
    records = []
    for (op, backend, dtype), group in groups.items():
        failures = [r for r in group if not r.passed and not r.detail.startswith(NOT_RUN)]
        if not failures and any(r.detail.startswith(NOT_RUN) for r in group):
            continue
        worst = max(r.ratio for r in group)
        records.append(
            verification.new_record(
                op, backend, device, getattr(torch, dtype), not failures,
                checks=len(group),
                configs=len({c for r in group for c in r.configs}),
                worst_ratio=round(worst, 4) if math.isfinite(worst) else worst,
                detail=f"{failures[0].label}: {failures[0].detail}" if failures else "",
                quick=quick,
            )
        )  # fmt: skip
    return records


def selftest(
    device: str | torch.device | None = None,
    quick: bool = False,
    *,
    ops: list[str] | None = None,
    jobs: int | None = None,
    record: bool = True,
    write_manifest: bool = False,
    json_path: str | os.PathLike | None = None,
    progress: bool = True,
    stream=sys.stdout,
    deadline: float | None = None,
) -> SelftestReport:
    """Check every fused kernel that can run on ``device`` against the spec, forward and backward, and record it.

    Args:
        device: 'cuda', 'cuda:1', 'cpu' (default: the current GPU, else the CPU; Triton runs on CPU tensors only
            under ``TRITON_INTERPRET=1``).
        quick: fewer shapes and head dims (CI, compute-sanitizer); its passes are not evidence for ``auto``.
        ops: only these ops (default: every op with a fused backend).
        jobs: worker processes (default: on a GPU up to 8, one per 2 CPU cores; on CPU 1, in this process).
        record: write the verdicts to the user's cache (``fastvit.verification.cache_path()``).
        write_manifest: also merge them into the package's shipped manifest (GPU rounds; full runs only),
            dropping its records of kernel sources that no longer exist.
        json_path: write the full report (every check) as JSON there.
        progress: show a progress bar (stderr).
        stream: where the table goes (None: print nothing).
        deadline: seconds after which no further check starts (running workers are stopped): the rest are
            reported not run, and only the (op, backend, dtype) groups that finished get verdicts, recorded and
            written as usual (a time-boxed GPU round keeps its evidence instead of losing all of it). None: no limit.

    Returns:
        the :class:`SelftestReport`; ``report.passed`` is False when any check failed or nothing could run.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be a CUDA device or 'cpu', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: no CUDA device is available here; use --device cpu (Triton's interpreter)")
    known = sorted({op for op, _ in dispatch.fused_implementations()})
    unknown = sorted(set(ops or ()) - set(known))
    if unknown:
        raise ValueError(f"ops: unknown or unfused op(s) {unknown}; ops with fused kernels: {', '.join(known)}")
    if jobs is None:
        jobs = min(8, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 1
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or deadline <= 0):
        raise ValueError(f"deadline must be a positive number of seconds, got {deadline!r}")
    start = time.perf_counter()
    stop_at = None if deadline is None else time.monotonic() + deadline
    checks, skipped = plan(device, quick, ops)
    with _progress(len(checks), progress and stream is not None) as bar:
        if jobs == 1 or len(checks) <= 1:
            results = _run_in_process(checks, device, bar, stop_at)
        else:
            by_index = _run_in_workers(checks, device, quick, ops, min(jobs, len(checks)), bar, stop_at)
            results = [by_index[i] for i in range(len(checks))]
    records = _records(results, device, quick)
    report = SelftestReport(
        str(device), verification.device_facts(device).name, quick, time.perf_counter() - start, results, records,
        skipped,
    )  # fmt: skip
    notes = []
    if record and records:
        path = verification.cache_path()
        verification.write_records(path, records)
        notes.append(f"recorded {len(records)} verdicts in {path}")
    if write_manifest:
        notes.append(_write_manifest(records, device, quick))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=1) + "\n")
        notes.append(f"wrote the report to {json_path}")
    if stream is not None:
        print(format_report(report, notes), file=stream)
    return report


def _write_manifest(records: list[verification.Record], device: torch.device, quick: bool) -> str:
    if quick or device.type != "cuda":
        return "the manifest takes full runs on a GPU only: not written"
    current = {(op, b): verification.kernel_hash(op, b) for op, b in dispatch.fused_implementations()}
    keep = lambda r: current.get((r.op, r.backend), r.kernel_hash) == r.kernel_hash  # noqa: E731  (stale sources)
    verification.write_records(verification.MANIFEST_PATH, records, keep=keep)
    return f"merged {len(records)} verdicts into the shipped manifest {verification.MANIFEST_PATH}"


def format_report(report: SelftestReport, notes: list[str] = ()) -> str:
    """The table: one row per (op, backend, dtype), then the failures, the skipped backends and the notes."""
    lines = [
        f"fastvit selftest on {report.device} ({report.device_name}){' --quick' if report.quick else ''}: "
        f"{len(report.results)} checks in {report.seconds:.0f} s",
        f"{'op':<18} {'backend':<7} {'dtype':<9} {'checks':>6} {'configs':>7} {'worst err/bound':>15}  result",
    ]
    groups: dict[tuple[str, str, str], list[CheckResult]] = {}
    for result in report.results:
        groups.setdefault((result.op, result.backend, result.dtype), []).append(result)
    for (op, backend, dtype), group in groups.items():
        ran = [r for r in group if not r.detail.startswith(NOT_RUN)]
        worst = max((r.ratio for r in ran), default=0.0)
        worst_text = "inf" if not math.isfinite(worst) else f"{worst:.3f}"
        verdict = "pass" if all(r.passed for r in group) else ("FAIL" if any(not r.passed for r in ran) else "not run")
        # configs: the distinct forced kernel configs; '-' when none is forced (the launcher's own choice per
        # shape: the interpreter's, cuBLASLt's)
        configs = len({c for r in group for c in r.configs}) or "-"
        lines.append(f"{op:<18} {backend:<7} {dtype:<9} {len(group):>6} {configs:>7} {worst_text:>15}  {verdict}")
    failures = [r for r in report.results if not r.passed and not r.detail.startswith(NOT_RUN)]
    not_run = [r for r in report.results if r.detail.startswith(NOT_RUN)]
    if not_run:
        lines.append(f"{len(not_run)} checks not run ({not_run[0].detail}); no verdict recorded for their groups")
    for r in failures[:20]:
        lines.append(f"FAIL {r.backend} {r.op} {r.dtype} [{r.label}]: {r.detail}")
    if len(failures) > 20:
        lines.append(f"... and {len(failures) - 20} more failures (--json PATH lists every check)")
    for what, why in report.skipped.items():
        lines.append(f"skipped {what}: {why}")
    if not report.results:
        lines.append("nothing could be checked on this device")
    lines += list(notes)
    lines.append("PASSED" if report.passed else "FAILED")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="check every fused kernel on this GPU (forward and backward, every dtype, every autotune "
        "config) against the fp64 spec, and record the verdicts that let backend='auto' use them",
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and head dims (passes are not evidence)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: the GPU if there is one)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write every check's result as JSON")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: up to 8 on a GPU)")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: every fused op)")
    parser.add_argument("--no-record", action="store_true", help="do not write the verdicts to the user's cache")
    parser.add_argument("--write-manifest", action="store_true", help="also merge them into fastvit/verified.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--deadline", type=float, default=None, metavar="SECONDS",
        help="start no check after SECONDS; the finished (op, dtype) groups are still recorded",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()] if args.ops else None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cpu" and not dispatch.triton_interpreter_enabled():
        # Triton runs on CPU tensors only in its interpreter, chosen when Triton is imported (``import fastvit``
        # already did): run again in a process that starts with it on.
        print(f"{PROG}: CPU tensors: running again under TRITON_INTERPRET=1 (Triton's interpreter)", file=sys.stderr)
        environment = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "fastvit", "selftest", *argv], env=environment)
    if args.worker:
        return _worker(args)
    try:
        report = selftest(
            args.device, args.quick, ops=args.ops, jobs=args.jobs, record=not args.no_record,
            write_manifest=args.write_manifest, json_path=args.json, progress=not args.no_progress,
            deadline=args.deadline,
        )  # fmt: skip
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0 if report.passed else 1
