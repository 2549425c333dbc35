#!/usr/bin/env bash
# The next device call for W4A16 single-stream decode (about 5 minutes on an H200):
#   1. L1 with quad sums (SAGEINFER_INT4_QUAD_SUMS=1: qkv, o and gate_up; down keeps the per-weight
#      loop) against without, twice each, alternating: turn it on in ops/gemv_int4.py if it is faster;
#   2. the step's one-row matmuls in CUDA graphs with down's input gated (SiLU(gate) * up formed by
#      every program, as now) and already activated (--down-plain), quad sums off and on, bf16 beside:
#      what a gate_up kernel that hands down its activation would save.
# Carry .whl where the project's packages are missing (scripts/device_wheels.sh; install as
# benchmarks/gpu_test_suite.sh's header says).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for run in 1 2; do
  for quad in 0 1; do
    SAGEINFER_INT4_QUAD_SUMS=$quad timeout 100 python3 benchmarks/run_standard.py --model \
      sageinfer/bench/standard/qwen3-8b-w4a16 --workloads L1-single-stream \
      --out "$OUT/l1-w4a16-quad-$quad-run-$run.json" > "$OUT/l1-w4a16-quad-$quad-run-$run.log" 2>&1
    echo "== L1 W4A16, quad sums $quad, run $run"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['L1-single-stream']; print(r['ttft_s'], r['tpot_s'])" \
      "$OUT/l1-w4a16-quad-$quad-run-$run.json" || tail -5 "$OUT/l1-w4a16-quad-$quad-run-$run.log"
  done
done
for quad in 0 1; do
  for down in gated plain; do
    flag=$([ "$down" = plain ] && echo --down-plain)
    echo "== one-row matmuls in graphs, quad sums $quad, down $down"
    SAGEINFER_INT4_QUAD_SUMS=$quad timeout 120 python3 benchmarks/experiments/graph_int4_one_row.py $flag \
      --out "$OUT/graph-quad-$quad-down-$down.json" 2>&1 | grep -v -i warn | cut -c1-220
  done
done
