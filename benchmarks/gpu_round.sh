#!/usr/bin/env bash
# One full GPU round in a single device call (see ../shared/GPU.md): facts, build, GPU tests, benchmarks, report.
#   bash benchmarks/gpu_round.sh [pytest -k expression for the benchmarks]
# Results land in $OUT (the device tool's output folder) or ./bench-out; copy them to benchmarks/results/.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
python -m pytest -x -q tests -m "not slow" > "$OUT/tests.log" 2>&1; tests_rc=$?
tail -5 "$OUT/tests.log"
stamp="$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")-$(date +%Y-%m-%d)"
python -m pytest benchmarks --benchmark-enable --benchmark-json="$OUT/$stamp.json" ${1:+-k "$1"} -q > "$OUT/bench.log" 2>&1
tail -5 "$OUT/bench.log"
python -m benchmarks.report "$OUT/$stamp.json" --out "$OUT" | tail -40
exit $tests_rc
