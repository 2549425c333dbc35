#!/usr/bin/env bash
# The next device call (about 10 minutes on an H200: split it if the limit is near), after the whole
# suite (benchmarks/gpu_test_suite.sh, a call of its own). Carry .whl and install it as
# benchmarks/gpu_test_suite.sh's header says.
#   0. the one-row 4-bit and quantization tests (the last changes to the fp16-pair loop, fp32 inputs
#      kept on the fp32 loop and zero points in fp16, ran on a GPU only in part);
#   0b. W4A16 one row with the next run's inputs and scales requested a run early (inputs_ahead, off
#      until timed): the step's 4-bit matmuls in CUDA graphs, then L1 off / on twice, alternating;
#   1. a decode step's 144 matmuls with groups of 16 (NVFP4 held as INT8): ops/gemv_grouped.py's trip
#      of 512, 1,024 (the default since 2026-12-03, untimed) and 2,048 input columns;
#   2. L1 on qwen3-8b-nvfp4 twice (9.40 ms a token at 128 columns a trip), qwen3-8b-w8a16 once (5.15 ms,
#      groups of 128: the trip unchanged).
# Keep the default trip if it is the fastest; write the results file (command, commit, device, date).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ops_gemv.py tests/test_quantization.py \
  -k "4bit or half_sums or one_row or w4a16" 2>&1 | tail -3
timeout 120 python3 benchmarks/experiments/graph_int4_one_row.py --down-plain --half-sums \
  --out "$OUT/graphs-inputs-ahead.json" 2>&1 | grep -v Warning | cut -c1-220
for run in 1 2; do
  for early in 0 1; do
    SAGEINFER_INT4_INPUTS_AHEAD=$early timeout 90 python3 benchmarks/run_standard.py --model "$S/qwen3-8b-w4a16" \
      --workloads L1-single-stream --out "$OUT/l1-w4a16-inputs-ahead-$early-$run.json" > "$OUT/l1.log" 2>&1
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['L1-single-stream']
print('inputs ahead', sys.argv[2], 'TPOT', r['tpot_s'])" "$OUT/l1-w4a16-inputs-ahead-$early-$run.json" "$early" \
      || tail -3 "$OUT/l1.log"
  done
done
timeout 240 python3 benchmarks/experiments/time_8bit_step.py --group 16 --formats int8 --out "$OUT/step-group-16.json"
for model in qwen3-8b-nvfp4 qwen3-8b-w8a16 qwen3-8b-nvfp4; do
  timeout 120 python3 benchmarks/run_standard.py --model "$S/$model" --workloads L1-single-stream \
    --out "$OUT/l1-$model.json" > "$OUT/l1-$model.log" 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['L1-single-stream']
print(sys.argv[2], 'TTFT', r['ttft_s'], 'TPOT', r['tpot_s'])" "$OUT/l1-$model.json" "$model" || tail -3 "$OUT/l1-$model.log"
done
