#!/usr/bin/env bash
# What the next GPU call should settle, in one device call of about 4 minutes: the one-row W4A16 matmul
# in fp16 pairs (ops/gemv_int4_halves.py, SAGEINFER_W4A16_PAIRS=1; off by default until this has run).
#   - the engine's quantization tests with it on (tiny W4A16 models through the engine), and the
#     kernel's own tests;
#   - L1 with a W4A16 model, pairs off and on, twice each (2026-12-02e: 4.71 / 4.56 ms).
# Turn it on in layers/quantization/w4a16.py only if nothing fails.
# Carry .whl where the project's packages are missing (filled by scripts/device_wheels.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SAGEINFER_W4A16_PAIRS=1 timeout ${TEST_SECONDS:-240} python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_quantization.py \
  tests/test_ops_gemv.py tests/test_ops_gemv_int4_halves.py > "$OUT/tests-w4a16-pairs.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests-w4a16-pairs.log" | tail -8
for pairs in ${PAIRS_RUNS:-0 1 0 1}; do
  SAGEINFER_W4A16_PAIRS=$pairs timeout 100 python3 benchmarks/run_standard.py --model \
    sageinfer/bench/standard/qwen3-8b-w4a16 --workloads L1-single-stream --out "$OUT/l1-w4a16-pairs-$pairs.json" \
    > "$OUT/l1-w4a16-pairs-$pairs.log" 2>&1
  echo "== L1 W4A16, pairs $pairs"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['L1-single-stream']; print(r['ttft_s'], r['tpot_s'])" \
    "$OUT/l1-w4a16-pairs-$pairs.json" || tail -5 "$OUT/l1-w4a16-pairs-$pairs.log"
done
