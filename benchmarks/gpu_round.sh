#!/usr/bin/env bash
# One GPU round in a single device call, time-boxed to the lease (../shared/GPU.md: 15 device-minutes in all, at
# most 10 per command, at most 8 files back):
#   facts -> build -> selftest (writes the shipped manifest fastvit/verified.json) -> GPU tests (-m "gpu and not
#   slow") -> compute-sanitizer memcheck on `selftest --quick` -> headline benchmarks -> report -> pack
#
#   bash benchmarks/gpu_round.sh              # run it (on the GPU machine)
#   bash benchmarks/gpu_round.sh --dry-run    # print the plan, each step's estimate and cap, and the totals
#   bash benchmarks/gpu_round.sh --budget 420 # a tighter round (seconds; default 480 = 8 min)
#   bash benchmarks/gpu_round.sh --profile families   # the families' goals instead (issue 18): facts -> build ->
#       selftest (auto's evidence) -> attention N = 729 head dim 72 vs every SDPA backend -> DINOv3-B/16 and
#       EVA02-B/14 (batch 256) and SigLIP so400m/14-384 inference vs timm eager and timm + torch.compile -> report
#   FASTVIT_COMMIT=<hash> bash benchmarks/gpu_round.sh   # name the measured commit (the device copy has no .git)
#
# Fits its budget by construction: every step runs under `timeout` with min(its cap, the time left before the
# round's deadline), the deadline being the budget minus what the report and the packing need; a step with too
# little time left is skipped and says so. The GPU tests and the sanitizer (both correctness, no timing) run side
# by side; the benchmarks run alone. The estimates are for an H200 with 16 cores, cold (nothing built, empty
# Triton cache); a warm machine rebuilds in seconds.
#
# Results: at most 7 files in $OUT (the device tool's output folder; ./bench-out here): summary.txt (the table
# printed last), verified.json (the manifest to commit), gemm_choices.json (auto's measured GEMM choices, to commit
# as fastvit/gemm_choices.json), selftest.json, bench.json, report.md and round.tar.gz (every log, the sanitizer
# output, the report's PNGs). Copy them to benchmarks/results/ and commit with the measured commit (summary.txt
# names it).
set -uo pipefail

BUDGET=480
DRY_RUN=0
PROFILE=headline
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET="${2-}"; shift ;;
    --profile) PROFILE="${2-}"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_round.sh: unknown argument $1 (--dry-run, --budget SECONDS, --profile headline|families)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_round.sh: --budget must be a number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
case "$PROFILE" in
  headline|families) ;;
  *) echo "gpu_round.sh: --profile must be headline or families, got '$PROFILE'" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
RESERVE=45  # report + pack + timeout's kill grace (10 s) after the last step
PY=${PYTHON:-python}
OUT=${OUT:-bench-out}
BENCH_ENV="FASTVIT_BENCH_PROFILE=$PROFILE FASTVIT_BENCH_ROUNDS=10"
BENCH="$PY -m pytest --benchmark-enable -q -p no:cacheprovider"

# name | estimate (s) | cap (s) | mode | command. mode 'with-next': runs in the background beside the next step (the
# pair takes the longer of the two). Commands run in the repository; $WORK is the scratch folder round.tar.gz packs,
# $STEP_LIMIT the step's own limit (seconds).
STEPS=(
  "facts|5|20|alone|nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv && $PY -c \"import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)\" && nproc"
  "build|80|200|alone|TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=\${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . && $PY -m fastvit info"
  "selftest|70|150|alone|$PY -m fastvit selftest --write-manifest --no-progress --deadline \$((STEP_LIMIT > 40 ? STEP_LIMIT - 20 : STEP_LIMIT / 2)) --json \$WORK/selftest.json"
  "gpu-tests|90|150|with-next|$PY -m pytest tests -m 'gpu and not slow' -q -ra --maxfail=20 -p no:cacheprovider"
  "sanitizer|45|90|alone|if ! command -v compute-sanitizer >/dev/null; then echo 'REFUSED: compute-sanitizer is not on this machine'; else compute-sanitizer --tool memcheck --error-exitcode 86 $PY -m fastvit selftest --quick --no-record --no-progress --jobs 1 --json \$WORK/sanitizer-selftest.json; rc=\$?; grep -q 'Device not supported' \$WORK/logs/sanitizer.log && echo 'REFUSED: the machine refuses compute-sanitizer (Device not supported)'; exit \$rc; fi"
  "bench-ops|80|110|alone|$BENCH_ENV $BENCH benchmarks/test_bench_attention.py benchmarks/test_bench_ln_mlp.py benchmarks/test_bench_patch_embed.py benchmarks/test_bench_varlen.py benchmarks/test_bench_packed.py --benchmark-json=\$WORK/bench-ops.json"
  "bench-model|110|180|alone|$BENCH_ENV $BENCH benchmarks/test_bench_model.py --benchmark-json=\$WORK/bench-model.json"
)
if [ "$PROFILE" = families ]; then  # the same facts, build and selftest; no tests; the goals' benchmarks
  STEPS=(
    "${STEPS[@]:0:3}"
    "bench-attn|40|90|alone|$BENCH_ENV $BENCH benchmarks/test_bench_attention.py --benchmark-json=\$WORK/bench-attention.json"
    "bench-model|220|280|alone|$BENCH_ENV $BENCH benchmarks/test_bench_model.py -k inference --benchmark-json=\$WORK/bench-model.json"
  )
fi

estimate_total=0  # the pairs count their longer step
held=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r _name estimate _cap mode _command <<<"$step"
  if [ "$mode" = with-next ]; then held=$estimate; continue; fi
  estimate_total=$((estimate_total + (estimate > held ? estimate : held)))
  held=0
done

if [ "$DRY_RUN" = 1 ]; then
  printf '%-12s %9s %7s  %s\n' step "estimate" cap command
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name estimate cap mode command <<<"$step"
    [ "$mode" = with-next ] && name="$name &"
    printf '%-12s %8ss %6ss  %s\n' "$name" "$estimate" "$cap" "${command:0:110}"
  done
  printf '%-12s %8ss %6ss  %s\n' report+pack 15 "$RESERVE" "merge the benchmark JSONs, python -m benchmarks.report, tar"
  total=$((estimate_total + 15))
  echo "('&': runs beside the next step)"
  echo "estimated total: ${total} s ($((total / 60)) min $((total % 60)) s) on an H200, 16 cores, cold"
  echo "hard limit: ${BUDGET} s ($((BUDGET / 60)) min $((BUDGET % 60)) s): every step is cut at the deadline $((BUDGET - RESERVE)) s, then report + pack"
  if [ "$estimate_total" -le $((BUDGET - RESERVE)) ]; then
    echo "fits: yes (the steps' estimates end $((BUDGET - RESERVE - estimate_total)) s before the deadline)"
  else
    echo "fits: NO (the steps' estimates run past the deadline: the last steps would be cut)"
    exit 1
  fi
  exit 0
fi

START=$(date +%s)
DEADLINE=$((START + BUDGET - RESERVE))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastvit-round.XXXXXX")
export WORK
mkdir -p "$WORK/logs" "$OUT"
SUMMARY="$WORK/summary.txt"
COMMIT=${FASTVIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}  # the device copy has no .git
export FASTVIT_COMMIT="$COMMIT"  # the benchmark JSON's machine_info.git_commit (benchmarks/harness.py)
echo "fastvit GPU round ($PROFILE), commit ${COMMIT}, budget ${BUDGET} s, $(date -u +%Y-%m-%dT%H:%MZ)" >"$SUMMARY"
printf '%-12s %6s %8s  %s\n' step rc seconds note >>"$SUMMARY"
BUILD_OK=1

run_step() {  # name cap command
  local name=$1 cap=$2 command=$3 now left limit rc begin note
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$name" != facts ] && [ "$name" != build ] && [ "$BUILD_OK" = 0 ]; then
    printf '%-12s %6s %8s  %s\n' "$name" - 0 "skipped: the build failed" >>"$SUMMARY"; return
  fi
  if [ "$left" -lt 15 ]; then
    printf '%-12s %6s %8s  %s\n' "$name" - 0 "skipped: ${left} s left before the deadline" >>"$SUMMARY"; return
  fi
  limit=$((cap < left ? cap : left))
  begin=$(date +%s)
  echo "== $name (limit ${limit} s) ==" >&2
  # SIGINT, not SIGTERM: a pytest cut at its limit still ends its session, so pytest-benchmark writes the JSON of
  # what finished (SIGTERM loses all of it); KILL 10 s later if it does not stop
  # STEP_LIMIT: the step's own limit, for commands that stop themselves before it (the selftest's --deadline: the
  # groups it finished are still recorded)
  STEP_LIMIT=$limit timeout -s INT -k 10 "$limit" bash -c "$command" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  note=""
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="cut at ${limit} s"; fi
  if grep -q '^REFUSED:' "$WORK/logs/$name.log"; then note="$(grep -m1 '^REFUSED:' "$WORK/logs/$name.log")"; fi
  if [ "$name" = build ] && [ "$rc" != 0 ]; then BUILD_OK=0; note="build failed: see logs/build.log${note:+ (${note})}"; fi
  tail -3 "$WORK/logs/$name.log" >&2
  printf '%-12s %6s %8s  %s\n' "$name" "$rc" "$(($(date +%s) - begin))" "$note" >>"$SUMMARY"
}

for step in "${STEPS[@]}"; do
  IFS='|' read -r name _estimate cap mode command <<<"$step"
  if [ "$mode" = with-next ]; then
    run_step "$name" "$cap" "$command" &
  else
    run_step "$name" "$cap" "$command"
    wait  # a step started beside this one
  fi
done

# Report: merge the suites' JSONs (same session facts), render, update the GEMM choices; then pack at most 7 files.
$PY - "$WORK" <<'EOF' >"$WORK/logs/report.log" 2>&1
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
parts = [json.loads(p.read_text()) for p in sorted(work.glob("bench-*.json"))]
if parts:
    merged = dict(parts[0])
    merged["benchmarks"] = [b for part in parts for b in part["benchmarks"]]
    (work / "bench.json").write_text(json.dumps(merged, indent=1))
EOF
if [ -f "$WORK/bench.json" ]; then
  timeout -k 5 30 $PY -m benchmarks.report "$WORK/bench.json" --out "$WORK/report" >>"$WORK/logs/report.log" 2>&1
  # auto's GEMM choices: where the Triton GEMMs beat their alternative in this run (benchmarks/gemm_choices.py)
  timeout -k 5 20 $PY -m benchmarks.gemm_choices "$WORK/bench.json" --write >"$WORK/logs/gemm-choices.log" 2>&1
fi
printf 'total %s s of %s s\n' "$(($(date +%s) - START))" "$BUDGET" >>"$SUMMARY"
cp "$SUMMARY" "$OUT/summary.txt"
[ -f fastvit/verified.json ] && cp fastvit/verified.json "$OUT/verified.json"
[ -f "$WORK/selftest.json" ] && cp "$WORK/selftest.json" "$OUT/selftest.json"
[ -f "$WORK/bench.json" ] && cp "$WORK/bench.json" "$OUT/bench.json"
cp fastvit/gemm_choices.json "$OUT/gemm_choices.json"
[ -f "$WORK/report/bench.md" ] && cp "$WORK/report/bench.md" "$OUT/report.md"
tar czf "$OUT/round.tar.gz" -C "$WORK" .
trap 'rm -rf "$WORK"' EXIT

# Printed last (the device tool returns the tail of the output).
echo
grep -A40 '^fastvit selftest on' "$WORK/logs/selftest.log" 2>/dev/null | head -45
tail -4 "$WORK/logs/gpu-tests.log" 2>/dev/null
tail -4 "$WORK/logs/sanitizer.log" 2>/dev/null
[ -f "$WORK/report/bench.md" ] && head -60 "$WORK/report/bench.md"
cat "$WORK/logs/gemm-choices.log" 2>/dev/null
cat "$SUMMARY"
grep -q '^build  *0 ' "$SUMMARY" && grep -q '^selftest  *0 ' "$SUMMARY"
