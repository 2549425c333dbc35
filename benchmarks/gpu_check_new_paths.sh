#!/usr/bin/env bash
# What the next GPU call should settle, in one device call of about 8 minutes: INT8 KV rows read as
# 32-bit words (ops/int8_values.py, SAGEINFER_INT8_KV_WORDS=1; off by default until this has run).
#   - correctness compiled for the GPU: the quantised-KV and attention kernel tests with it on;
#   - decode attention in isolation, bytes cast (0) against words (1) (us a layer; at 2c62165 bf16 158.7,
#     INT8 133.8 at batch 256 x 640 keys);
#   - chat-mix offline, INT8 KV with it off and on, beside bf16 (at 323974b INT8 was 0.958x of bf16);
#   - L1/L2 with an INT8 cache and it on (1cfa732: L1 TPOT 5.09 ms, L2 6.03 ms; bf16 4.91 / 6.12).
# Flip its default in ops/paged_attention.py only if chat-mix gains and nothing fails.
# Carry .whl where the project's packages are missing (filled by scripts/device_wheels.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SAGEINFER_INT8_KV_WORDS=1 timeout 200 python3 -m pytest -q -x tests/test_kv_quant.py tests/test_ops_paged_attention.py \
  tests/test_ops_cascade_attention.py > "$OUT/tests-int8-words.log" 2>&1; tail -3 "$OUT/tests-int8-words.log"
for words in 0 1; do
  echo "== decode attention, SAGEINFER_INT8_KV_WORDS=$words"
  SAGEINFER_INT8_KV_WORDS=$words timeout 100 python3 benchmarks/experiments/probe_quantized_decode.py \
    --modes auto,int8 --configs 64:2:2 2>&1 | grep -v -i warn | tail -12
done
for run in auto:0 int8:0 int8:1; do
  IFS=: read dtype words <<< "$run"
  SAGEINFER_INT8_KV_WORDS=$words timeout 120 python3 benchmarks/mixes_offline.py --engine sageinfer \
    --model sageinfer/bench/standard/qwen3-8b --mixes chat-mix:1000 --kv-cache-dtype $dtype \
    --out "$OUT/chat-mix-kv-$dtype-words-$words.json" > "$OUT/chat-mix-kv-$dtype-words-$words.log" 2>&1
  echo "== chat-mix, KV $dtype, words $words"; grep -i "tok/s" "$OUT/chat-mix-kv-$dtype-words-$words.log" | tail -2
done
SAGEINFER_INT8_KV_WORDS=1 timeout 150 python3 benchmarks/run_standard.py --workloads L1-single-stream,L2-long-context \
  --kv-cache-dtype int8 --out "$OUT/latency-int8-words.json" > "$OUT/latency-int8-words.log" 2>&1
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print({w: {k: v for k, v in r[w].items()
  if 'ms' in k or k.endswith('_s')} for w in r})" "$OUT/latency-int8-words.json" || tail -5 "$OUT/latency-int8-words.log"
