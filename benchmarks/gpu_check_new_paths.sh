#!/usr/bin/env bash
# The paths built since the last GPU run, tested there and timed, in one device call of about 4 minutes:
#   - the shared-memory KV connector: a prompt's KV copied layer by layer while it computes (a hook the
#     model calls after each layer), and a consumer that maps producers' regions before their first
#     load: its tests, then a 32K prompt's KV through the region with the prompt in 1, 2 and 4 chunks
#     (all but the last chunk staged before the clock; on an H200 before: 0.190 s end to end, 16% of
#     the prompt's 1.17 s prefill; the first transfer 1.466 s). The engine-level effect (a served PD
#     pair with SharedMemoryConnector) is for benchmarks/gpu_pd.sh with CONNECTOR=SharedMemoryConnector.
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=200 tests/test_pd_transfer.py \
  > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -8
for chunks in 1 2 4; do
  echo "== a 32K prompt's KV through the staging region, the prompt in $chunks chunk(s)"
  timeout 90 python3 benchmarks/pd_transfer_bandwidth.py --repeats 3 --early-chunks $chunks \
    --result-file "$OUT/shm-region-chunks$chunks.json" 2>&1 | grep -E "^repeat|rror" | cut -c1-300
done
