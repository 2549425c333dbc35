#!/usr/bin/env bash
# One device call (about 6 minutes on an H200): the 4-bit one-row loop in fp16 pairs (half_sums,
# NVIDIA's packed fp16x2 instructions) and two runs of words in flight (ahead), checked and timed
# against the fp32 quad-sum loop with one.
#   1. their tests on the GPU (the PTX path runs only there);
#   2. a decode step's 144 one-row 4-bit matmuls in CUDA graphs, at a few tiles;
#   3. W4A16 L1 for each of the four combinations, twice, alternating.
# Carry .whl and install it as benchmarks/gpu_test_suite.sh's header says.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ops_gemv.py -k "half_sums" 2>&1 | tail -4
timeout 200 python3 benchmarks/experiments/graph_int4_one_row.py --down-plain --half-sums \
  --out "$OUT/graphs-half-sums.json" 2>&1 | grep -v Warning
for run in 1 2; do
  for variant in "0 1" "0 2" "1 1" "1 2"; do
    set -- $variant
    SAGEINFER_INT4_HALF_SUMS=$1 SAGEINFER_INT4_AHEAD=$2 timeout 120 python3 benchmarks/run_standard.py \
      --model "$S/qwen3-8b-w4a16" --workloads L1-single-stream --out "$OUT/l1-w4a16-half-$1-ahead-$2-run-$run.json" \
      > "$OUT/l1.log" 2>&1
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['L1-single-stream']
print('half_sums', sys.argv[2], 'ahead', sys.argv[3], 'run', sys.argv[4], 'TTFT', r['ttft_s'], 'TPOT', r['tpot_s'])" \
      "$OUT/l1-w4a16-half-$1-ahead-$2-run-$run.json" "$1" "$2" "$run" || tail -5 "$OUT/l1.log"
  done
done
