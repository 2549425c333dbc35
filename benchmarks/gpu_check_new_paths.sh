#!/usr/bin/env bash
# The paths built since the last GPU run, tested there and timed, in one device call of about 6 minutes:
#   - the shared-memory KV connector's page-locked staging region (cudaHostRegister on both sides,
#     copy streams): its tests, then a 32K prompt's KV (4.8 GB) through the region and through a file
#     per prompt (0.98 GB/s end to end on an H100 before the region);
#   - INT8 KV attention converting values without I2F: its kernels' tests, then chat-mix's decode
#     attention with INT8 against bf16 (1.714 against 1.470 s of _paged_attention_kernel in steps
#     150-230 of 600 requests on an H200 before the change).
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=200 tests/test_pd_transfer.py \
  tests/test_kv_quant.py tests/test_ops_paged_attention.py tests/test_ops_prefill_attention.py \
  tests/test_ops_cascade_attention.py > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -8
echo "== a 32K prompt's KV through shared memory: the staging region, then a file per prompt"
timeout 90 python3 benchmarks/pd_transfer_bandwidth.py --repeats 3 --result-file "$OUT/shm-region.json" 2>&1 \
  | grep -E "^repeat|rror|region" | cut -c1-300
timeout 60 python3 benchmarks/pd_transfer_bandwidth.py --repeats 1 --staging-gb 0 --result-file "$OUT/shm-file.json" 2>&1 \
  | grep -E "^repeat|rror" | cut -c1-300
for kv in int8 auto; do
  echo "== chat-mix, KV $kv"
  timeout 140 python3 benchmarks/profile_mix.py --mix chat-mix --num-prompts 600 --window 150:230 --kv-cache-dtype $kv \
    2>&1 | grep -E "^## |^\| (eager|decode)|_paged_attention_kernel|rror" | head -12
done
