#!/usr/bin/env bash
# One device call: the standard workloads on Qwen3-8B shapes (dummy weights) for each weight
# quantization, after the bf16 baseline, each in its own process. Results in $OUT/quant-*.json.
# Usage: bash benchmarks/gpu_quant.sh [workloads]   (default T1, T2, L1)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=${1:-T1-prefill-heavy,T2-decode-heavy,L1-single-stream}
S=sageinfer/bench/standard
run() {  # name, then run_standard flags
  local name=$1; shift
  echo "== $name"
  python3 benchmarks/run_standard.py --workloads "$W" --out "$OUT/quant-$name.json" "$@" 2>&1 \
    | grep -v "it/s\]" | grep -E "^\| |startup|Error|error" | tail -8
}
run bf16
run fp8-w8a8 --quantization fp8
run fp8-w8a8-kv8 --quantization fp8 --kv-cache-dtype fp8
run fp8-block --model $S/qwen3-8b-fp8-block
run int8-w8a8 --model $S/qwen3-8b-int8-w8a8
run w4a16 --model $S/qwen3-8b-w4a16
run w8a16 --model $S/qwen3-8b-w8a16
run nvfp4 --model $S/qwen3-8b-nvfp4
run mxfp4 --model $S/qwen3-8b-mxfp4
run int8-w8a8-at-load --quantization int8
run bnb-nf4 --model $S/qwen3-8b-bnb-nf4
