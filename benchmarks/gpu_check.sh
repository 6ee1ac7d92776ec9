#!/usr/bin/env bash
# Everything a GPU lent for a few minutes should measure, into one folder (issue 12, item 4):
#   1. the GPU equivalence tests (pytest -m gpu: CUDA graphs, reduce-overhead compile, the memory
#      probe, compiled training, each against the eager network) -> gpu_tests.xml, gpu_tests.log
#   2. the throughput benchmarks (benchmarks/bench_gpu.py: fp32 vs bf16/fp16 autocast, eager vs
#      compiled vs CUDA graphs; training samples/s, DDIM evaluations/s and slices/s, FLOPs per
#      evaluation and achieved TFLOP/s, the measured matmul ceiling) -> env.json, flops.json,
#      matmul.json, inference.csv, training.csv, summary.md
#   plus nvidia-smi.txt and status.txt (each step's exit code).
# Each step has its own timeout (tests 150 s, benchmarks bench_gpu's --budget-s 300 s and a hard
# 360 s), so the whole run stays under 8 minutes on one GPU.
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [OUT]     (OUT defaults to $OUT, else runs/gpu_check)
#        DRY_RUN=1 benchmarks/gpu_check.sh OUT         the same steps on CPU, tiny sizes, seconds
# PYTHON selects the interpreter (default: python).
set -uo pipefail

dry="${DRY_RUN:-0}"
dest=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) dest="$arg" ;;
  esac
done
dest="${dest:-${OUT:-runs/gpu_check}}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
cd "$repo"

bench_args=(--out "$dest" --budget-s 300)
test_timeout=150
if [ "$dry" = "1" ]; then
  bench_args=(--out "$dest" --dry-run --budget-s 240)
  test_timeout=60
  export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU path even on a GPU machine
fi

{ nvidia-smi 2>&1 || echo "nvidia-smi not available"; } > "$dest/nvidia-smi.txt"
: > "$dest/status.txt"

timeout "$test_timeout" "$py" -m pytest -m gpu tests/test_accel.py -q -p no:cacheprovider \
  --junitxml "$dest/gpu_tests.xml" > "$dest/gpu_tests.log" 2>&1
echo "gpu_tests $?" >> "$dest/status.txt"

timeout 360 "$py" benchmarks/bench_gpu.py "${bench_args[@]}" > "$dest/bench_gpu.log" 2>&1
echo "bench_gpu $?" >> "$dest/status.txt"

cat "$dest/status.txt"
# Non-zero when any step failed or timed out, so a caller sees it; the files stay either way.
! grep -qv ' 0$' "$dest/status.txt"
