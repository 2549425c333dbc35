#!/usr/bin/env bash
# The paths built since the last GPU run, tested there and timed, in one device call of about 4 minutes:
#   - the decode-attention warm-up in the background (a4e783f): from just after the model is built, on a
#     one-block cache, while the memory profile and the cache allocation run; start-up waits for it before
#     the graph capture. Start-up from an empty Triton cache was 38.1 s at 3cf469c (decode warm-up 6.8 s
#     of it, on the main thread's path); whether anything compiles while serving after it (0 at 3cf469c).
# Carry .whl where the project's packages are missing (see benchmarks/gpu_test_suite.sh).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=120 \
  tests/test_decode_warm_up.py tests/test_warm_up.py tests/test_graph_sizes.py > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -8
cache=$(mktemp -d)
for run in empty filled; do
  echo "== start-up, Triton cache $run"
  TRITON_CACHE_DIR=$cache timeout 150 python3 benchmarks/startup_compiles.py --out "$OUT/startup-$run.json" 2>&1 \
    | grep -E "^start-up|^\||token prompt|rror" | head -14
done
