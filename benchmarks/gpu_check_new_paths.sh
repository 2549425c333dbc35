#!/usr/bin/env bash
# What the next GPU call should settle, in one device call of about 8 minutes:
#   - single-stream decode at 32K with each KV dtype, with the plan's long-decode splits as they are
#     (32 below 64K keys) and lowered (64 splits of at least 512 keys from 32K keys:
#     SAGEINFER_LONG_DECODE_KEYS=32768 SAGEINFER_LONG_DECODE_MIN_KEYS=512). In isolation 64 splits took
#     FP8 / INT8 / bf16 33.1 / 37.6 / 39.5 us a layer at 32K keys against 44.8 / 50.1 / 42.2 with 32
#     (experiments/probe_quantized_decode.py); L2's TPOT was FP8 6.62, INT8 7.02, bf16 6.20 ms.
#     L1 runs too: the lowered plan must not slow a short sequence.
#   - where INT8 KV loses 4% to bf16 on chat-mix although its decode kernel is faster in isolation:
#     a window of decode steps profiled with each dtype (benchmarks/profile_mix.py).
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for plan in default lowered; do
  for dtype in auto fp8 int8; do
    env $([ $plan = lowered ] && echo SAGEINFER_LONG_DECODE_KEYS=32768 SAGEINFER_LONG_DECODE_MIN_KEYS=512) \
      timeout 150 python3 benchmarks/run_standard.py --workloads L1-single-stream,L2-long-context \
      --kv-cache-dtype $dtype --out "$OUT/latency-$plan-$dtype.json" > "$OUT/latency-$plan-$dtype.log" 2>&1
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print(sys.argv[2], sys.argv[3], {w: {k: v
      for k, v in r[w].items() if 'ms' in k or k.endswith('_s')} for w in r})" "$OUT/latency-$plan-$dtype.json" \
      $plan $dtype || tail -5 "$OUT/latency-$plan-$dtype.log"
  done
done
for dtype in auto int8; do
  timeout 150 python3 benchmarks/profile_mix.py --mix chat-mix --num-prompts 600 --window 150:230 \
    --kv-cache-dtype $dtype > "$OUT/profile-$dtype.txt" 2>&1
  echo "== chat-mix profile, KV $dtype"; grep -v -i warn "$OUT/profile-$dtype.txt" | tail -30
done
