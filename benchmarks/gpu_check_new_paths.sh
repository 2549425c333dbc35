#!/usr/bin/env bash
# The paths built since the last GPU run, tested there and timed, on one GPU in device calls of about
# 10 minutes: PART=1 (tests, the probes, chat-mix as it is and with ragged decode splits), PART=2
# (chat-mix with an FP8 cache, summarize-mix, long-mix, block FP8 with and without its split), PART=3
# (chat-mix with an INT8 cache).
#   - tests: a mixed step's decodes on the decode kernel, the rest on a prefill kernel (the runner
#     puts single-token sequences first); decode splits of a least size (ragged batches)
#   - decode attention of ragged batches, no split against splits of at least N keys (one layer)
#   - W4A16's matmuls split over input features too, a whole step: one row (SAGEINFER_INT4_GEMV_MIN_PROGRAMS)
#     and 2-32 rows (SAGEINFER_W4A16_SPLIT_K=0)
#   - chat-mix offline with where its time goes (profile_mix.py): as it is, with ragged decode splits
#     (SAGEINFER_RAGGED_DECODE_SPLITS=8), with an FP8 cache; then summarize-mix, long-mix, INT8
#   - block FP8 T2 at 32 sequences with and without its split over K (SAGEINFER_FP8_BLOCK_MIN_PROGRAMS)
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PART=${PART:-1}
if [ "$PART" = 1 ]; then
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=120 \
  tests/test_attention_step_plans.py tests/test_ops_paged_attention.py tests/test_generation_vs_transformers.py \
  tests/test_ops_gemv.py -k "split or mixed or triton or ragged or tensor_core" \
  > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -12
timeout 90 python3 benchmarks/experiments/probe_ragged_decode.py 2>&1 | grep -v Warn | tee "$OUT/ragged_decode.txt"
timeout 120 python3 benchmarks/experiments/time_int4_step.py --rows 1,2,8,16,32 \
  --paths "gemv,gemv split,mma,mma split,bf16" \
  --out "$OUT/int4_step_split.json" 2>&1 | grep -v Warn
fi
# Headline, steps by path and the window's busy line of each run; the kernel tables stay in $OUT.
keep() { grep -E "^## |^\| (eager|decode graph|prefill graph)|^### "; }
# (the windows of 2026-12-01-h200-mixed-steps.md's profiles)
case $PART in
  1) RUNS="chat-mix:1000:150:auto:0 chat-mix:1000:150:auto:8" ;;
  2) RUNS="chat-mix:1000:150:fp8:0 summarize-mix:300:100:auto:0 long-mix:300:100:auto:0" ;;
  *) RUNS="chat-mix:1000:150:int8:0" ;;
esac
for run in $RUNS; do
  IFS=: read -r mix n first kv ragged <<< "$run"
  echo "== $mix, KV cache $kv, ragged decode splits $ragged"
  SAGEINFER_RAGGED_DECODE_SPLITS=$ragged timeout 170 python3 benchmarks/profile_mix.py --mix "$mix" --num-prompts "$n" \
    --window "$first:$((first + 100))" --kv-cache-dtype "$kv" > "$OUT/profile-$mix-$kv-$ragged.txt" 2>&1
  keep < "$OUT/profile-$mix-$kv-$ragged.txt"
done
# Block FP8 at 32 sequences (2-64 rows: the small-batch kernel), without and with its split over K.
for min_programs in $([ "$PART" = 2 ] && echo 0 264); do
  echo "== T2 at 32 sequences, block FP8, SAGEINFER_FP8_BLOCK_MIN_PROGRAMS=$min_programs"
  SAGEINFER_FP8_BLOCK_MIN_PROGRAMS=$min_programs timeout 150 python3 benchmarks/run_standard.py \
    --model sageinfer/bench/standard/qwen3-8b-fp8-block --workloads T2-decode-heavy --max-num-seqs 32 \
    --out "$OUT/t2-seqs32-fp8-block-split$min_programs.json" 2>&1 | grep -E "^\| T2|Error" | cut -c1-300
done
