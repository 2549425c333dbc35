#!/usr/bin/env bash
# The next device call for single-stream decode (about 8 minutes on an H200; both options are off by
# default until this has run):
#   1. L1 twice each, alternating, with
#      - SAGEINFER_INT4_QUAD_SUMS=1 (ops/gemv_int4.py: qkv, o and gate_up sum each thread's four
#        columns before the scale; down keeps the per-weight loop),
#      - SAGEINFER_ONE_ROW_ACTIVATE=1 (layers/linear.py: gate_up hands out silu(gate) * up, down takes a
#        plain input),
#      on the W4A16 model (none, quad, activate, both) and on bf16 weights (none, activate);
#   2. the step's one-row 4-bit matmuls in CUDA graphs with down's input already activated
#      (graph_int4_one_row.py --down-plain), quad sums off and on.
# Turn on what is faster. Carry .whl where the project's packages are missing (scripts/device_wheels.sh;
# install as benchmarks/gpu_test_suite.sh's header says).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
l1() {  # model, quad sums, activate, run
  local name="l1-$(basename "$1")-quad-$2-activate-$3-run-$4"
  SAGEINFER_INT4_QUAD_SUMS=$2 SAGEINFER_ONE_ROW_ACTIVATE=$3 timeout 100 python3 benchmarks/run_standard.py \
    --model "$1" --workloads L1-single-stream --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  printf '%s ' "$name"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['L1-single-stream']; print(r['ttft_s'], r['tpot_s'])" \
    "$OUT/$name.json" || tail -3 "$OUT/$name.log"
}
W4=sageinfer/bench/standard/qwen3-8b-w4a16
BF16=sageinfer/bench/standard/qwen3-8b
for run in 1 2; do
  for opts in "0 0" "1 0" "0 1" "1 1"; do l1 $W4 $opts $run; done
  for act in 0 1; do l1 $BF16 0 $act $run; done
done
for quad in 0 1; do
  echo "== one-row 4-bit matmuls in graphs, quad sums $quad, down's input already activated"
  SAGEINFER_INT4_QUAD_SUMS=$quad timeout 100 python3 benchmarks/experiments/graph_int4_one_row.py --down-plain \
    --out "$OUT/graph-quad-$quad-down-plain.json" 2>&1 | grep -v -i warn | cut -c1-220
done
