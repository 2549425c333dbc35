#!/usr/bin/env bash
# The paths built since the last GPU run, tested there and timed, in one device call of about 6 minutes:
#   - the shared-memory KV connector: a prompt that finds the staging region full waits for a range to
#     be read (its offset then in the .ready marker) instead of going through a file, and files go on
#     threads of their own; the decode-attention plan that gives one sequence of 64K keys or more 64
#     splits. Their tests first (PD transfer, attention kernels and plans).
#   - INT8 KV scales stored head-major (22f8766): decode attention over bf16, INT8 token-major and INT8
#     head-major (benchmarks/experiments/probe_int8_scale_layout.py; before, INT8 ran 17% behind bf16).
#   - the long-prompt mix through a PD pair on one GPU, the IPC and the shared-memory connector back to
#     back at the same commit (benchmarks/gpu_pd.sh, long-mix only, 100 requests at 4 req/s), with the
#     KV transfer metrics of both instances: on 2026-12-02 the shared-memory pair served 3.60 req/s
#     (TTFT p50 7.95 s) where the IPC pair had served 4.02 (1.88 s) at an older commit on 12-01.
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=200 tests/test_pd_transfer.py \
  tests/test_ops_paged_attention.py tests/test_attention_step_plans.py tests/test_ops_prefill_attention.py \
  tests/test_kv_quant.py > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -8
timeout 120 python3 benchmarks/experiments/probe_int8_scale_layout.py 2>&1 | grep -v -i warn
for connector in DeviceIpcConnector SharedMemoryConnector; do
  echo "== PD pair, $connector"
  mkdir -p "$OUT/$connector"
  SKIP_SINGLE=1 CONNECTOR=$connector RATES= MIX_RATE=4 MIX_PROMPTS=100 BANDWIDTH_SECONDS=1 START_GAP=6 \
    OUT="$OUT/$connector" timeout 200 bash benchmarks/gpu_pd.sh 2>&1 | grep -v "^repeat\|^{\|created"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('req/s %.2f, TTFT p50 %.0f ms, TPOT p50 %.1f ms' % (
    d['request_throughput'], d['ttft_ms']['median'], d['tpot_ms']['median']))" "$OUT/$connector/pd_serve_pd_long-mix.json"
done
