#!/usr/bin/env bash
# FP4 weights at four bits on one GPU (about 8 minutes on an H200), after carrying .whl and installing it
# as benchmarks/gpu_test_suite.sh's header says:
#   0. the FP4 and one-row 4-bit kernel tests (NVIDIA's PTX for FP4 values runs only on a GPU);
#   1. L1 on qwen3-8b-nvfp4 twice (9.40 ms a token when FP4 was held as INT8; 3.58 at four bits), then T2
#      once (2 to 32 rows through the tensor-core kernel, more through the expansion; 11,790 tok/s).
# (benchmarks/results/2026-12-03c-h200-fp4-four-bits.md)
# Key numbers go to stdout, the JSONs to $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
report() {  # json, workload, label
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][sys.argv[2]]
print(sys.argv[3], sys.argv[2], {k: round(v, 5) for k, v in r.items() if k in ('ttft_s', 'tpot_s', 'total_tok_s')})" \
    "$@"
}
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_ops_fp4.py tests/test_quantization.py \
  -k "fp4 or half_sums" 2>&1 | tail -3
for run in 1 2; do
  timeout 120 python3 benchmarks/run_standard.py --model "$S/qwen3-8b-nvfp4" --workloads L1-single-stream \
    --out "$OUT/l1-nvfp4-$run.json" > "$OUT/run.log" 2>&1 && report "$OUT/l1-nvfp4-$run.json" L1-single-stream nvfp4 \
    || tail -5 "$OUT/run.log"
done
timeout 150 python3 benchmarks/run_standard.py --model "$S/qwen3-8b-nvfp4" --workloads T2-decode-heavy \
  --out "$OUT/t2-nvfp4.json" > "$OUT/run.log" 2>&1 && report "$OUT/t2-nvfp4.json" T2-decode-heavy nvfp4 \
  || tail -5 "$OUT/run.log"
