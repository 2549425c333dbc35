#!/usr/bin/env bash
# The weight-quantization schemes beside vLLM, one engine per device call: ../shared/bench/engine_bench.py
# (carried as .peer/bench, ../shared/bench/vllm-on-device.md) with the same prompts, limits and timing
# for both engines, Qwen3-8B shapes, dummy weights.
#   ENGINE=vllm       vLLM 0.26.0 (its bundle installed in /tmp/site)
#   ENGINE=sageinfer  this tree (carry .whl: its packages go to /tmp/ours, apart from vLLM's)
# SCHEMES: bf16, fp8-kv8 (fp8 at load time + FP8 KV cache) or a config under sageinfer/bench/standard
# (w4a16, nvfp4, mxfp4, w8a16, int8-w8a8, fp8-block). WORKLOADS: engine_bench's --only.
# Results: $OUT/quant-<engine>-<scheme>.json, one line a workload printed.
# CEILINGS=1 (ENGINE=sageinfer): the card's ceilings first (benchmarks/ceilings.py, $OUT/ceilings.json), and
# each run's workloads as fractions of their floors after it (benchmarks/fraction_of_ceilings.py).
set -u
ENGINE=${ENGINE:-sageinfer}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
BENCH=${BENCH:-.peer/bench}
export PYTHONUNBUFFERED=1
if [ "$ENGINE" = vllm ]; then
  export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1
else
  [ -d /tmp/ours ] || python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/ours .whl/*.whl
  export PYTHONPATH=/tmp/ours:$PWD
  if [ "${CEILINGS:-0}" = 1 ]; then python3 benchmarks/ceilings.py --out "$OUT/ceilings.json"; fi
fi
for scheme in ${SCHEMES:-w4a16 nvfp4}; do
  case $scheme in
    bf16) args="--model $S/qwen3-8b" ;;
    fp8-kv8) args="--model $S/qwen3-8b --quantization fp8 --kv-cache-dtype fp8" ;;
    *) args="--model $S/qwen3-8b-$scheme" ;;
  esac
  echo "== $ENGINE $scheme"
  # shellcheck disable=SC2086
  timeout "${RUN_SECONDS:-400}" python3 "$BENCH/engine_bench.py" --engine "$ENGINE" --workloads "$BENCH/workloads.json" \
    --only "${WORKLOADS:-T1-prefill-heavy,T2-decode-heavy,L1-single-stream}" --no-ceilings $args \
    --out "$OUT/quant-$ENGINE-$scheme.json" > "/tmp/quant-$ENGINE-$scheme.log" 2>&1
  echo "exit $?"
  grep -E "^(startup|T1|T2|L1|L2|P1)" "/tmp/quant-$ENGINE-$scheme.log" | cut -c1-220
  grep -E "Error|error:" "/tmp/quant-$ENGINE-$scheme.log" | grep -v -i warn | tail -3
  if [ -f "$OUT/ceilings.json" ] && [ -f "$OUT/quant-$ENGINE-$scheme.json" ] && [ "$ENGINE" = sageinfer ]; then
    python3 benchmarks/fraction_of_ceilings.py --ceilings "$OUT/ceilings.json" "$scheme:$OUT/quant-$ENGINE-$scheme.json"
  fi
done
