#!/usr/bin/env bash
# One device call (about 6 minutes on an H200): the 4-bit one-row loop in fp16 pairs (half_sums,
# NVIDIA's packed fp16x2 instructions) checked and timed against the fp32 quad-sum loop.
#   1. its tests on the GPU (the PTX path runs only there);
#   2. a decode step's 144 one-row 4-bit matmuls in CUDA graphs, at a few tiles;
#   3. W4A16 L1 with SAGEINFER_INT4_HALF_SUMS=0 / 1, twice each, alternating.
# Carry .whl and install it as benchmarks/gpu_test_suite.sh's header says.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ops_gemv.py -k "half_sums" 2>&1 | tail -4
timeout 200 python3 benchmarks/experiments/graph_int4_one_row.py --down-plain --half-sums \
  --out "$OUT/graphs-half-sums.json" 2>&1 | grep -v Warning
for run in 1 2; do
  for half in 0 1; do
    SAGEINFER_INT4_HALF_SUMS=$half timeout 120 python3 benchmarks/run_standard.py --model "$S/qwen3-8b-w4a16" \
      --workloads L1-single-stream --out "$OUT/l1-w4a16-half-$half-run-$run.json" > "$OUT/l1.log" 2>&1
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['L1-single-stream']
print('half_sums', sys.argv[2], 'run', sys.argv[3], 'TTFT', r['ttft_s'], 'TPOT', r['tpot_s'])" \
      "$OUT/l1-w4a16-half-$half-run-$run.json" "$half" "$run" || tail -5 "$OUT/l1.log"
  done
done
