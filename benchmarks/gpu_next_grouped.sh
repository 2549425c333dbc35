#!/usr/bin/env bash
# The next device call for 8-bit weights with group scales (about 7 minutes on an H200):
#   1. the kernels' and layers' tests on the GPU (ops/gemv_grouped.py, the INT8 weight-only paths);
#   2. L1 twice each, alternating, SAGEINFER_GROUPED_GEMV=0|1 (ops/gemv_grouped.py, off by default),
#      on block FP8 (qwen3-8b-fp8-block: 6.0 ms a token so far, per-channel FP8 3.8) and W8A16
#      (qwen3-8b-w8a16, never run on a GPU);
#   3. W8A16 on T1 and T2 (2-64 rows through the 8-bit weight-only kernel, more expanded).
# Turn the grouped kernel on if it is faster on both. Carry .whl where the project's packages are
# missing (scripts/device_wheels.sh; install as benchmarks/gpu_test_suite.sh's header says).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_ops_gemv.py tests/test_ops_weight_only.py \
  tests/test_quantization.py -k "group or 8_bit or 8bit or w8a16" 2>&1 | tail -3
run() {  # model, grouped, workloads, name
  SAGEINFER_GROUPED_GEMV=$2 timeout 120 python3 benchmarks/run_standard.py --model "$S/$1" --workloads "$3" \
    --out "$OUT/$4.json" > "$OUT/$4.log" 2>&1
  printf '%s ' "$4"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']
print({w: {k: v.get(k) for k in ('ttft_s', 'tpot_s', 'total_tok_s') if v.get(k)} for w, v in r.items()})" \
    "$OUT/$4.json" || tail -3 "$OUT/$4.log"
}
for pass in 1 2; do
  for model in qwen3-8b-fp8-block qwen3-8b-w8a16; do
    for grouped in 0 1; do run $model $grouped L1-single-stream "l1-$model-grouped-$grouped-pass-$pass"; done
  done
done
run qwen3-8b-w8a16 0 T1-prefill-heavy,T2-decode-heavy "w8a16-t1-t2"
