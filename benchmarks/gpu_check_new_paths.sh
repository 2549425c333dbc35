#!/usr/bin/env bash
# One device call on one GPU (about 10 minutes; in order of need, so a time limit cuts the last): the
# paths built since the last GPU run, tested there and timed.
#   - tests: a mixed step's decodes on the decode kernel, the rest on a prefill kernel (the runner
#     puts single-token sequences first)
#   - the mixes offline with where their time goes (profile_mix.py): chat, summarize, long
#   - chat-mix with FP8 and INT8 KV caches beside bf16 (a quantized cache should never be slower)
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=120 \
  tests/test_mixed_step_attention.py tests/test_generation_vs_transformers.py -k "mixed or triton" > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -12
# Headline, steps by path and the window's busy line of each run; the kernel tables stay in $OUT.
keep() { grep -E "^## |^\| (eager|decode graph|prefill graph) |^### "; }
for run in chat-mix:1000:150:250:auto summarize-mix:300:100:200:auto long-mix:300:100:200:auto \
           chat-mix:1000:150:250:fp8 chat-mix:1000:150:250:int8; do
  IFS=: read -r mix n first end kv <<< "$run"
  echo "== $mix, KV cache $kv"
  timeout 170 python3 benchmarks/profile_mix.py --mix "$mix" --num-prompts "$n" --window "$first:$end" \
    --kv-cache-dtype "$kv" > "$OUT/profile-$mix-$kv.txt" 2>&1
  keep < "$OUT/profile-$mix-$kv.txt"
done
