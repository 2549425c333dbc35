#!/usr/bin/env bash
# The paths changed since the last GPU run, tested there and timed, in one device call of about 5 minutes:
#   - decode attention: 2 pipeline stages instead of 3 for every cache dtype, INT8 values cast directly
#     (not through fp32's bits). Their tests first, then benchmarks/experiments/probe_quantized_decode.py
#     at both stage counts (distinct K and V caches per layer, no L2 reuse).
#   - chat-mix offline (1,000 requests) with a bf16, an FP8 and an INT8 KV cache, one process each, in
#     this call (benchmarks/mixes_offline.py): on 2026-12-02 INT8 was 0.95x of bf16, FP8 1.03x.
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=180 tests/test_ops_paged_attention.py \
  tests/test_attention_step_plans.py tests/test_ops_cascade_attention.py tests/test_kv_quant.py > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -8
(cd benchmarks/experiments && timeout 150 python3 probe_quantized_decode.py --configs 64:2:2,3) 2>&1 | grep -v -i warn \
  | tee "$OUT/probe_quantized_decode.txt"
for dtype in auto fp8 int8; do
  timeout 150 python3 benchmarks/mixes_offline.py --engine sageinfer --model sageinfer/bench/standard/qwen3-8b \
    --mixes chat-mix:1000 --kv-cache-dtype $dtype --out "$OUT/mixes-kv-$dtype.json" > "$OUT/mixes-kv-$dtype.log" 2>&1
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); m=d['mixes']['chat-mix']; print(sys.argv[2], 'chat-mix',
    round(m['total_tok_s']), 'tok/s', round(m['seconds'], 1), 's')" "$OUT/mixes-kv-$dtype.json" $dtype || tail -5 "$OUT/mixes-kv-$dtype.log"
done
