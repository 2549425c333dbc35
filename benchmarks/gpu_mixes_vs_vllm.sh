#!/usr/bin/env bash
# A mix beside vLLM in one device call: vLLM 0.26.0 once (its bundle already in /tmp/site, carried as
# ../shared/bench/vllm-on-device.md says), then this tree once per admission lookahead, the same prompts,
# limits and sampling (benchmarks/mixes_offline.py, one engine per process, one pass each).
#   MIX        name:requests (default chat-mix:1000)
#   SAMPLING   greedy (default), llama (temperature 0.6, top-p 0.9) or qwen3 (0.6, top-k 20, top-p 0.95)
#   LOOKAHEADS this engine's admission lookaheads, one run each (default: the engine's own, "default")
#   VLLM=0     skips vLLM (an A/B of this tree alone)
# Carry .whl too: this tree's packages go to /tmp/ours, apart from vLLM's. Results: $OUT/mix-*.json and a
# table of the lines each run printed.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MIX=${MIX:-chat-mix:1000}; SAMPLING=${SAMPLING:-greedy}; LOOKAHEADS=${LOOKAHEADS:-default}
MODEL=sageinfer/bench/standard/qwen3-8b
export PYTHONUNBUFFERED=1
case "$SAMPLING" in
  greedy) FLAGS="" ;;
  llama) FLAGS="--temperature 0.6 --top-p 0.9" ;;
  qwen3) FLAGS="--temperature 0.6 --top-k 20 --top-p 0.95" ;;
  *) echo "SAMPLING must be greedy, llama or qwen3" >&2; exit 2 ;;
esac
run() {  # label, PYTHONPATH, mixes_offline arguments...
  local label=$1 path=$2; shift 2
  PYTHONPATH=$path timeout 300 python3 benchmarks/mixes_offline.py --model "$MODEL" --mixes "$MIX" $FLAGS "$@" \
    --out "$OUT/mix-$label.json" > "$OUT/mix-$label.log" 2>&1
  echo "$label: $(grep -E '^\| (vllm|sageinfer) ' "$OUT/mix-$label.log" | tail -1)"
}
if [ "${VLLM:-1}" != 0 ]; then
  HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
    run "vllm-$SAMPLING" "/tmp/site:$PWD" --engine vllm
fi
[ -d /tmp/ours ] || python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/ours .whl/*.whl
for lookahead in $LOOKAHEADS; do
  if [ "$lookahead" = default ]; then
    run "sageinfer-$SAMPLING" "/tmp/ours:$PWD" --engine sageinfer
  else
    run "sageinfer-$SAMPLING-lookahead-$lookahead" "/tmp/ours:$PWD" --engine sageinfer \
      --admission-lookahead-tokens "$lookahead"
  fi
done
