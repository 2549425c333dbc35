#!/usr/bin/env bash
# One device call on one GPU (about 8 minutes): the paths built on the CPU since the last GPU run,
# tested there and timed.
#   - tests: the one-row 8-bit GEMV (per-row and block scales), FP8 KV prefill in the tiled kernel,
#     the long-prompt warm-up, KV events, quantization
#   - cold start and FP8 KV prefill: L2 (a 32K prompt) in fresh processes, bf16 and FP8 KV caches;
#     the first of its two trials is the first long prompt after start-up
#   - one-row decode of 8-bit weights: L1 for bf16, FP8, FP8 + FP8 KV, block FP8, W4A16
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=240 tests/test_ops_gemv.py \
  tests/test_ops_prefill_attention.py tests/test_kv_quant.py tests/test_warm_up.py tests/test_kv_events.py \
  tests/test_quantization.py -k "not tp2" > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -12
for kv in auto fp8; do
  echo "== L2, KV cache $kv"
  python3 benchmarks/run_standard.py --workloads L2-long-context --kv-cache-dtype "$kv" --out "$OUT/l2-kv-$kv.json" \
    2>&1 | grep -E "^startup|ttft_all|Error" | cut -c1-300
done
bash benchmarks/gpu_quant.sh L1-single-stream
