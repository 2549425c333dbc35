#!/usr/bin/env bash
# One device call on one GPU (about 10 minutes; in order of need, so a time limit cuts the last): the paths built on the CPU since the last GPU run,
# tested there and timed.
#   - tests: FP8 attention's fp16 query (paged, cascade, page-tiled prefill; bf16 queries past fp16's
#     range), INT8 caches widened for the long-prompt kernel, INT8 weights without I2F in the skinny
#     GEMV, block FP8's fp16 tile dots
#   - decode attention per cache dtype (tune_decode_attention.py: the FP8 tile after its conversion
#     changed)
#   - L2 (a 32K prompt) with INT8 and FP8 KV caches: INT8 now on the Hopper kernel
#   - L1 for INT8 W8A8; T2 at 32 sequences for block FP8 (the 2-64 row kernel)
#   - a decode step's 4-bit matmuls as one CUDA graph (time_int4_step.py)
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=120 tests/test_ops_paged_attention.py \
  tests/test_ops_cascade_attention.py tests/test_ops_prefill_attention.py tests/test_hopper_attention.py \
  tests/test_ops_gemv.py tests/test_ops_weight_only.py > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -12
timeout 150 python3 benchmarks/experiments/tune_decode_attention.py --modes fp8,auto --out "$OUT/decode_attention.json" \
  2>&1 | grep -v Warn | tail -12
for kv in int8 fp8; do
  echo "== L2, KV cache $kv"
  timeout 100 python3 benchmarks/run_standard.py --workloads L2-long-context --kv-cache-dtype "$kv" \
    --out "$OUT/l2-kv-$kv.json" 2>&1 | grep -E "^\| L2|Error" | cut -c1-300
done
echo "== L1, INT8 W8A8"
timeout 80 python3 benchmarks/run_standard.py --model $S/qwen3-8b-int8-w8a8 --workloads L1-single-stream \
  --out "$OUT/l1-int8.json" 2>&1 | grep -E "^\| L1|Error" | cut -c1-300
timeout 120 python3 benchmarks/experiments/time_int4_step.py --out "$OUT/int4_step.json" 2>&1 | grep -v Warn | tail -24
echo "== T2 at 32 sequences, block FP8"
timeout 150 python3 benchmarks/run_standard.py --model $S/qwen3-8b-fp8-block --workloads T2-decode-heavy \
  --max-num-seqs 32 --out "$OUT/t2-seqs32-fp8-block.json" 2>&1 | grep -E "^\| T2|Error" | cut -c1-300
