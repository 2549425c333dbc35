#!/usr/bin/env bash
# What the next GPU call should settle, in one device call of about 5 minutes:
#   - single-stream decode with each KV dtype under the long-decode plan's defaults (64 splits from 32K
#     keys, each at least one key tile): L2's TPOT with FP8 / INT8 caches no slower than bf16's, and
#     L1 no slower than under the previous plan (bf16 / FP8 / INT8 TPOT 4.83 / 4.86 / 5.00 ms, H200).
#   - where long-mix's time goes offline (served, its median TTFT was 9.95 s against vLLM's 6.99 s):
#     steps by path, and the kernels of a window of prefill-heavy steps (benchmarks/profile_mix.py).
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for dtype in auto fp8 int8; do
  timeout 150 python3 benchmarks/run_standard.py --workloads L1-single-stream,L2-long-context \
    --kv-cache-dtype $dtype --out "$OUT/latency-$dtype.json" > "$OUT/latency-$dtype.log" 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print(sys.argv[2], {w: {k: v
    for k, v in r[w].items() if 'ms' in k or k.endswith('_s')} for w in r})" "$OUT/latency-$dtype.json" \
    $dtype || tail -5 "$OUT/latency-$dtype.log"
done
timeout 200 python3 benchmarks/profile_mix.py --mix long-mix --num-prompts 300 --window 10:30 \
  > "$OUT/profile-long-mix.txt" 2>&1
echo "== long-mix profile, bf16 KV"; grep -v -i warn "$OUT/profile-long-mix.txt" | tail -45
