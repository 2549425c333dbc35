#!/usr/bin/env bash
# One device call (about 9 minutes on an H200): the whole suite at the fp16-pair default for W4A16's
# one-row matmuls, then W4A16 L1 with the defaults and the step's 144 one-row 4-bit matmuls split
# over K (264 programs) or not. Carry .whl and install it as benchmarks/gpu_test_suite.sh's header says.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
GROUP=shared PART_SECONDS=420 OUT=$OUT timeout 450 bash benchmarks/gpu_test_suite.sh > /dev/null 2>&1
for f in "$OUT"/tests_*.log; do
  echo "== $(basename "$f")"; grep -E "^(FAILED|ERROR)" "$f" | head -5; grep -E "passed|failed" "$f" | tail -1
done
timeout 60 python3 benchmarks/run_standard.py --model "$S/qwen3-8b-w4a16" --workloads L1-single-stream \
  --out "$OUT/l1-w4a16-defaults.json" > "$OUT/l1.log" 2>&1
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['L1-single-stream']
print('W4A16 L1 defaults TTFT', r['ttft_s'], 'TPOT', r['tpot_s'])" "$OUT/l1-w4a16-defaults.json" || tail -5 "$OUT/l1.log"
timeout 80 python3 benchmarks/experiments/graph_int4_one_row.py --down-plain --half-sums \
  --out "$OUT/graphs-split.json" 2>&1 | grep -v Warning | cut -c1-220
