"""Turn a GPU round's benchmark JSON into ``auto``'s GEMM choices (``fastvit/gemm_choices.json``).

    python -m benchmarks.gemm_choices bench.json            # print what the results support, change nothing
    python -m benchmarks.gemm_choices bench.json --write    # and merge it into fastvit/gemm_choices.json

``auto`` takes the Triton GEMMs (``ln_mlp``'s and ``ln_linear``'s ``triton`` backend) only where this table says
they won (``fastvit.gemm_choices``). A choice compares candidates timed in the same run against the implementation
``auto`` runs otherwise, per (op, shape bucket, dtype, GPU capability), and is made only where every case of the
bucket agrees (every batch size, both modes):

* ``ln_mlp``, bucket ``C x hidden`` (``benchmarks/test_bench_ln_mlp.py::test_ln_mlp``): "fastvit triton" against
  "fastvit cuda" (cuBLASLt + the extension's kernels), forward and forward + backward. The suite runs the plain ViT
  MLP, so the entry names that variant (``'layer/gelu'``, ``fastvit.gemm_choices.mlp_variant``): a win there does
  not switch SwiGLU or sub-LN MLPs of the same shape.
* ``ln_linear``, bucket ``K x N`` (``test_block_gemm``, the LayerNorm-prologue GEMMs the model calls it for: qkv
  and fc1): "fastvit triton" against "torch eager" (the LayerNorm, then the Linear and its glue on cuBLAS: what the
  model runs otherwise). That suite times the forward only: the choice then covers training too, so it says so in
  its evidence.

Triton must be at least ``MARGIN`` times faster (median time) in every case; a bucket measured without such a win
loses an earlier ``triton`` entry for its key (the newest measurement decides), buckets not measured keep theirs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastvit import gemm_choices

MARGIN = 1.02  # run-to-run spread of a median over 10 rounds on one GPU is ~1%: ask for more than noise
TRITON = "fastvit triton"
# suite -> (op, the candidate auto runs otherwise, the extra_info fields naming the bucket's (in, out) features)
SUITES = {
    "ln_mlp": ("ln_mlp", "fastvit cuda", ("width", "hidden")),
    "block_gemm": ("ln_linear", "torch eager", ("k", "n")),
}
LAYER_NORM_GEMMS = {"qkv", "fc1"}
BENCHED_MLP_VARIANT = gemm_choices.mlp_variant(
    "layer", "gelu", False
)  # what test_ln_mlp runs  # block_gemm cases that model calls of ops.ln_linear look like


def _median(bench: dict) -> float | None:
    stats = bench.get("stats") or {}
    return stats.get("median")


def measured_ratios(run: dict) -> dict[tuple[str, str, str], list[tuple[str, float]]]:
    """{(op, bucket, dtype name): [(case label, alternative time / triton time), ...]} for every case of ``run``
    (a pytest-benchmark JSON) where both candidates were timed."""
    times: dict[tuple, dict[str, float]] = {}
    for bench in run.get("benchmarks", []):
        info = bench.get("extra_info", {})
        suite = SUITES.get(info.get("suite"))
        median = _median(bench)
        if suite is None or median is None or info.get("candidate") not in (TRITON, suite[1]):
            continue
        if info.get("suite") == "block_gemm" and info.get("gemm") not in LAYER_NORM_GEMMS:
            continue
        op, _, (in_key, out_key) = suite
        bucket = gemm_choices.shape_bucket(int(info[in_key]), int(info[out_key]))
        dtype = str(info.get("dtype", "")).removeprefix("torch.")
        times.setdefault((op, bucket, dtype, info.get("case", "")), {})[info["candidate"]] = median
    ratios: dict[tuple[str, str, str], list[tuple[str, float]]] = {}
    for (op, bucket, dtype, case), by_candidate in sorted(times.items()):
        alternative = SUITES["ln_mlp" if op == "ln_mlp" else "block_gemm"][1]
        if TRITON in by_candidate and alternative in by_candidate:
            ratios.setdefault((op, bucket, dtype), []).append((case, by_candidate[alternative] / by_candidate[TRITON]))
    return ratios


def choices_from_run(run: dict, source: str) -> tuple[list[dict], list[tuple[str, str, str, str]]]:
    """(entries where Triton won every case of its bucket, the keys measured without such a win) for ``run``.

    Raises:
        ValueError: ``run`` was not measured on a GPU (no compute capability in its machine_info).
    """
    machine = run.get("machine_info", {})
    capability = machine.get("capability")
    if not capability or machine.get("smoke_mode"):
        raise ValueError(f"{source}: not a GPU run (no compute capability in machine_info): no choice can come of it")
    wins, losses = [], []
    for (op, bucket, dtype), cases in measured_ratios(run).items():
        worst = min(ratio for _, ratio in cases)
        if worst < MARGIN:
            losses.append((op, bucket, dtype, capability))
            continue
        alternative = SUITES["ln_mlp" if op == "ln_mlp" else "block_gemm"][1]
        detail = ", ".join(f"{case} {ratio:.2f}x" for case, ratio in cases)
        scope = "" if op == "ln_mlp" else "; forward measured, chosen for training too"
        evidence = f"{source} ({machine.get('device', '?')}): vs {alternative}: {detail}{scope}"
        entry = dict(op=op, bucket=bucket, dtype=dtype, capability=capability, backend="triton", evidence=evidence)
        if op == "ln_mlp":
            entry["variant"] = BENCHED_MLP_VARIANT
        wins.append(entry)
    return wins, losses


def _key(entry: dict) -> tuple[str, ...]:
    return (entry["op"], entry["bucket"], entry["dtype"], entry["capability"], entry.get("variant", ""))


def merge(table: dict, wins: list[dict], losses: list[tuple[str, str, str, str]]) -> dict:
    """``table`` (the JSON of ``fastvit/gemm_choices.json``) with this run's wins set and its losses removed (a loss
    removes the entries of the variant the suite measured)."""
    decided = {_key(e) for e in wins}
    decided |= {(*loss, BENCHED_MLP_VARIANT if loss[0] == "ln_mlp" else "") for loss in losses}
    kept = [e for e in table.get("choices", []) if _key(e) not in decided]
    return {**table, "choices": kept + wins}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gemm_choices", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a GPU round's pytest-benchmark JSON (bench.json)")
    parser.add_argument("--write", action="store_true", help=f"merge the choices into {gemm_choices.CHOICES_PATH}")
    parser.add_argument("--table", type=Path, default=gemm_choices.CHOICES_PATH, help="the choices file to update")
    args = parser.parse_args(argv)
    try:
        run = json.loads(args.results.read_text())
        wins, losses = choices_from_run(run, args.results.name)
    except (OSError, ValueError) as exc:
        print(f"gemm_choices: {exc}", file=sys.stderr)
        return 2
    for entry in wins:
        print(f"triton wins  {entry['op']:<9} {entry['bucket']:<10} {entry['dtype']:<9} sm {entry['capability']}")
    for op, bucket, dtype, capability in losses:
        print(f"no win       {op:<9} {bucket:<10} {dtype:<9} sm {capability}: auto keeps the other backend")
    if not wins and not losses:
        print("no case with both 'fastvit triton' and its alternative timed: nothing to decide")
    if args.write:
        table = json.loads(args.table.read_text())
        args.table.write_text(json.dumps(merge(table, wins, losses), indent=1) + "\n")
        print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
