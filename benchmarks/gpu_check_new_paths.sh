#!/usr/bin/env bash
# The paths built since the last GPU run, tested there and timed, on one GPU in device calls of about
# 8 minutes: PART=1 (tests; start-up with an empty and a filled Triton cache; ragged decode probe;
# chat-mix in two passes from an empty cache with its compiles and eager decode steps profiled),
# PART=2 (T2 and P1 with ragged decode splits on, as by default, and off; chat-mix with graphs up to
# 1,024 sequences: its decode steps past 512 ran eagerly at 73 ms for ~565 sequences).
#   - the start-up's decode-attention warm-up (attention/decode_warm_up.py): its seconds on an empty
#     cache (startup_s, warm_up_s of the JSON) and whether a mix's passes still compile anything
#   - ragged decode splits: a sequence one split covers writes its output itself (uniform batches of
#     short sequences paid 13% in attention before)
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PART=${PART:-1}
headline() { grep -E "^\| (L1|T2|P1)|Error|startup" | cut -c1-200; }
if [ "$PART" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=120 \
    tests/test_decode_warm_up.py tests/test_attention_step_plans.py tests/test_ops_paged_attention.py \
    > "$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -8
  cache=$(mktemp -d)
  for run in empty filled; do
    echo "== L1, Triton cache $run"
    TRITON_CACHE_DIR=$cache timeout 150 python3 benchmarks/run_standard.py --workloads L1-single-stream \
      --out "$OUT/l1-cache-$run.json" 2>&1 | headline
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('startup_s', round(d['startup_s'], 1), \
'graph_capture_s', round(d['graph_capture_s'], 1), 'warm_up_s', round(d['warm_up_s'], 1))" "$OUT/l1-cache-$run.json"
  done
  timeout 90 python3 benchmarks/experiments/probe_ragged_decode.py 2>&1 | grep -v Warn | grep -E "case|no split|8 splits >= 1024" \
    | tee "$OUT/ragged_decode.txt"
  echo "== chat-mix, two passes from an empty Triton cache"
  TRITON_CACHE_DIR=$(mktemp -d) timeout 240 python3 benchmarks/profile_mix.py --mix chat-mix --num-prompts 1000 \
    --window 150:250 --passes 2 --profile-eager-decode 20 --compiles-out "$OUT/compiles.json" > "$OUT/chat-mix.txt" 2>&1
  grep -E "^## |^\| (eager|decode graph)|^### |^Triton" "$OUT/chat-mix.txt"
  grep -A8 "eager decode steps" "$OUT/chat-mix.txt"
fi
if [ "$PART" = 2 ]; then
  for workload in T2-decode-heavy P1-shared-prefix; do
    for ragged in 8 0; do
      echo "== $workload, SAGEINFER_RAGGED_DECODE_SPLITS=$ragged"
      SAGEINFER_RAGGED_DECODE_SPLITS=$ragged timeout 140 python3 benchmarks/run_standard.py --workloads "$workload" \
        --out "$OUT/$workload-ragged$ragged.json" 2>&1 | headline
    done
  done
  echo "== chat-mix, --max-graph-batch-size 1024 (second pass)"
  timeout 240 python3 benchmarks/profile_mix.py --mix chat-mix --num-prompts 1000 --window 150:250 --passes 2 \
    --max-graph-batch-size 1024 > "$OUT/chat-mix-graphs1024.txt" 2>&1
  grep -E "^## |^\| (eager|decode graph)|^Triton" "$OUT/chat-mix-graphs1024.txt"
fi
