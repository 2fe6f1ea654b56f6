"""The shared benchmark harness: timing, inputs, correctness gates, device peaks and derived figures.

Every suite (``benchmarks/test_bench_*.py``) follows the same recipe:

1. build inputs with random data (``rotating(...)`` cycles through several copies when one set
   fits in L2, so kernels are not timed on cache-hot inputs);
2. run each candidate once and ``check_close`` it against the reference: a wrong-but-fast
   candidate fails loudly instead of appearing in the table;
3. time it with ``run_benchmark(benchmark, fn, ...)``: pytest-benchmark's pedantic mode, warm-up
   rounds first (they cover autotuning, torch.compile and CUDA-graph capture), the device
   synchronised inside every timed call, the median reported;
4. ``record(benchmark, ...)`` stores the case, candidate, shapes and dtype, and the derived figures
   (img/s, TFLOP/s, GB/s, MFU against the measured matmul peak, the FLOP and byte floors, and the
   speedup over every baseline already measured for the same case in this session).

On a machine without a GPU the suites run in smoke mode (tiny shapes, CPU): proof that they run,
not performance numbers. The default pytest options include ``--benchmark-disable``, which runs each
body once; ``make bench`` (``--benchmark-enable``) times them.

``FASTVIT_BENCH_PROFILE=headline`` (read by every suite, GPU mode only) keeps the headline cases a time-boxed
GPU round can afford (``benchmarks/gpu_round.sh``): ViT-B/16 inference at batch 256 and a training step at batch
128 against timm eager and timm + ``torch.compile``, attention at N = 197 and 577 (head dim 64), ``ln_mlp`` and
the patch embedding at ViT-B/16 sizes. ``FASTVIT_BENCH_PROFILE=families`` keeps the cases of the families' goals
(issue 18; ``gpu_round.sh --profile families``): attention at N = 729 with head dim 72 (SigLIP so400m) against
every SDPA backend, and DINOv3-B/16, EVA02-B/14 (batch 256) and SigLIP so400m/14-384 inference against timm eager
and timm + ``torch.compile``; a suite without a families cut keeps its headline cases. The default, ``full``, runs
everything.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
from collections.abc import Callable

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = DEVICE.type != "cuda"
BENCH_PROFILES = ("full", "headline", "families")


def bench_profile() -> str:
    """``FASTVIT_BENCH_PROFILE``: 'full' (default), 'headline' or 'families' (see the module docstring)."""
    profile = os.environ.get("FASTVIT_BENCH_PROFILE", "full").strip().lower() or "full"
    if profile not in BENCH_PROFILES:
        raise ValueError(f"FASTVIT_BENCH_PROFILE must be one of {BENCH_PROFILES}, got {profile!r}")
    return profile


PROFILE = bench_profile()


def profile_cases(full, headline, families=None):
    """``full`` (a dict of cases, or a list), cut on a GPU to the ``headline`` keys / items under the headline
    profile, to the ``families`` ones under the families profile (``None``: the headline ones); unchanged under the
    full profile and in smoke mode (its tiny cases). An entry ``full`` lacks is an error, so renaming a case cannot
    silently empty a round."""
    if PROFILE == "full" or SMOKE:
        return full
    keep = families if PROFILE == "families" and families is not None else headline
    missing = [key for key in keep if key not in full]
    if missing:
        raise KeyError(f"{PROFILE} profile: {missing} not among the suite's cases {list(full)}")
    if isinstance(full, dict):
        return {key: full[key] for key in keep}
    return [item for item in full if item in keep]


L2_BYTES = 50 * 2**20  # H100: 50 MiB; inputs smaller than twice this are rotated

# (suite, case) -> {candidate: median seconds}, filled as benchmarks run: the same-run speedups.
_MEDIANS: dict[tuple[str, str], dict[str, float]] = {}


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def synchronized(fn: Callable) -> Callable:
    """``fn`` followed by a device synchronisation, so wall-clock time covers the GPU work."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def rotating(make_inputs: Callable[[], tuple], bytes_per_set: int, max_sets: int = 8) -> Callable[[], tuple]:
    """A function returning the next of several input sets, enough of them to spill L2 (1 set if large)."""
    sets_needed = 1 if SMOKE or bytes_per_set >= 2 * L2_BYTES else math.ceil(2 * L2_BYTES / max(bytes_per_set, 1))
    sets = [make_inputs() for _ in range(min(max_sets, sets_needed))]
    state = {"i": -1}

    def next_inputs() -> tuple:
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]

    return next_inputs


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> float:
    """Fail loudly when a candidate's output is wrong; returns the max abs error (recorded)."""
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: output shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite output; not timing a broken candidate")
    error = (got - want).abs().max().item() if got.numel() else 0.0
    bound = atol + rtol * want.abs().max().item() if want.numel() else atol
    if error > bound:
        raise AssertionError(f"{name}: max |out - ref| = {error:.3g} > {bound:.3g}; not timing a wrong result")
    return error


def run_benchmark(benchmark, fn: Callable, warmup_rounds: int | None = None, rounds: int | None = None):
    """Time ``fn`` (synchronised) with pytest-benchmark; warm-up rounds are not timed. ``FASTVIT_BENCH_ROUNDS``
    (the GPU round sets it) overrides ``rounds``, a suite's own count included."""
    warmup_rounds = (1 if SMOKE else 5) if warmup_rounds is None else warmup_rounds
    if "FASTVIT_BENCH_ROUNDS" in os.environ:
        rounds = int(os.environ["FASTVIT_BENCH_ROUNDS"])
    elif rounds is None:
        rounds = 3 if SMOKE else 30
    timed = synchronized(fn)
    for _ in range(warmup_rounds):  # also under --benchmark-disable: compile/autotune/capture happen here
        timed()
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)


def _git_commit() -> str:
    """The measured commit: ``FASTVIT_COMMIT`` where set (the GPU round: the device's copy has no .git), else git's
    HEAD (``-dirty`` with uncommitted changes), else 'unknown'."""
    named = os.environ.get("FASTVIT_COMMIT", "").strip()
    if named:
        return named
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        if out.returncode != 0 or not out.stdout.strip():  # git, but no repository here
            return "unknown"
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


@functools.cache
def machine_info() -> dict:
    """Device and software facts stored with every result (and compared by benchmarks.compare)."""
    import fastvit

    info = {
        "device": torch.cuda.get_device_name()
        if DEVICE.type == "cuda"
        else f"cpu:{platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastvit": fastvit.__version__,
        "git_commit": _git_commit(),
        "smoke_mode": SMOKE,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        info.update(
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
        smi = _nvidia_smi("driver_version,clocks.sm,clocks.max.sm,clocks.mem")
        if smi:
            info["driver"], info["sm_clock"], info["sm_clock_max"], info["mem_clock"] = [
                s.strip() for s in smi.split(",")
            ]
    return info


def _median_seconds(fn: Callable, repeats: int) -> float:
    import time

    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.cache
def device_peaks() -> dict:
    """Measured once per session: dense matmul peak (bf16 on GPU, fp32 on CPU) and copy bandwidth.

    MFU and the roofline floors are relative to these measured figures, not to datasheet numbers.
    """
    if DEVICE.type == "cuda":
        size, dtype, copy_bytes = 8192, torch.bfloat16, 2**30
    else:
        size, dtype, copy_bytes = 512, torch.float32, 64 * 2**20
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    matmul_s = _median_seconds(lambda: a @ b, 10 if DEVICE.type == "cuda" else 5)
    src = torch.empty(copy_bytes // 4, device=DEVICE, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), 10 if DEVICE.type == "cuda" else 5)
    return {
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tflops": 2 * size**3 / matmul_s / 1e12,
        "copy_gbps": 2 * copy_bytes / copy_s / 1e9,  # read + write
    }


def record(
    benchmark,
    suite: str,
    case: str,
    candidate: str,
    *,
    flops: float | None = None,
    bytes_moved: float | None = None,
    items: int | None = None,
    item_name: str = "img",
    primary: str | None = None,
    **extra,
) -> None:
    """Store the identification and the derived figures of a timed benchmark in ``extra_info``.

    ``primary`` ('items' | 'tflops' | 'gbps') names the figure the report tabulates; by default
    items/s if ``items`` is given, else TFLOP/s, else GB/s. Candidates named "timm ...", "torch ..." or
    "sdpa ..." are the baselines the report computes speedups against.
    """
    info = benchmark.extra_info
    info.update(suite=suite, case=case, candidate=candidate, **extra)
    if primary is not None:
        if primary not in ("items", "tflops", "gbps"):
            raise ValueError(f"primary must be 'items', 'tflops' or 'gbps', got {primary!r}")
        info["primary"] = primary
    peaks = device_peaks()
    info["peaks"] = peaks
    if flops is not None:
        info["flops"] = flops
        info["flop_floor_s"] = flops / (peaks["matmul_tflops"] * 1e12)
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
        info["byte_floor_s"] = bytes_moved / (peaks["copy_gbps"] * 1e9)
    if items is not None:
        info["items"] = items
        info["item_name"] = item_name
    stats = getattr(benchmark, "stats", None)
    if not stats:  # --benchmark-disable: the body ran once as a correctness check, nothing was timed
        return
    median = stats["median"]
    info["median_s"] = median
    if flops is not None:
        info["tflops"] = flops / median / 1e12
        info["mfu"] = info["tflops"] / peaks["matmul_tflops"]
    if bytes_moved is not None:
        info["gbps"] = bytes_moved / median / 1e9
        info["bandwidth_fraction"] = info["gbps"] / peaks["copy_gbps"]
    if items is not None:
        info[f"{item_name}_per_s"] = items / median
    medians = _MEDIANS.setdefault((suite, case), {})
    medians[candidate] = median
    info["speedup_vs"] = {base: medians[base] / median for base in medians if base != candidate}
