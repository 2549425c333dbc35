#!/usr/bin/env bash
# Serving beside vLLM: one engine per device call, the same client, prompts, seeds and scheduler limits
# (max_num_seqs 1024, max_num_batched_tokens 16384) for each. Qwen3-8B shapes, dummy weights, bf16.
#   ENGINE=vllm              vLLM's OpenAI server (its bundle installed in /tmp/site: ../shared/bench/vllm-on-device.md)
#   ENGINE=sageinfer         our server, engine core in its own process (carry .whl for its packages)
#   ENGINE=sageinfer-thread  our server with the engine in a thread beside the HTTP loop (the old layout)
# Runs: 1024 in / 128 out x 200 at RATES (default 16 and all at once), then each mix of
# sageinfer/bench/mixed.py all at once (MIXES="name:requests ..."). Results: $OUT/<engine>-<run>.json;
# the server's log: /tmp/server-<engine>.log. RATES="" or MIXES="" skips those runs.
# LONG="65536 130944": LONG_PROMPTS prompts of each length one at a time (64 tokens out), for TTFT and
# TPOT at long context (MODEL=sageinfer/bench/standard/llama-3.1-8b VOCAB=128256: 128K positions).
set -u
ENGINE=${ENGINE:-sageinfer}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${MODEL:-sageinfer/bench/standard/qwen3-8b}
LIMITS="--max-num-seqs 1024 --max-num-batched-tokens 16384"
export PYTHONUNBUFFERED=1
if [ "$ENGINE" = vllm ]; then
  PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
    python3 -m vllm.entrypoints.openai.api_server --model $MODEL --load-format dummy --skip-tokenizer-init \
    --served-model-name m --port 8001 --dtype bfloat16 --seed 0 $LIMITS > "/tmp/server-$ENGINE.log" 2>&1 &
  CLIENT_PATH=$PWD
else
  if ! python3 -c "import fastapi, uvicorn, zmq, msgspec" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/ours .whl/*.whl
  fi
  CLIENT_PATH=/tmp/ours:$PWD${PYTHONPATH:+:$PYTHONPATH}  # where the packages already are, too
  THREAD=""; [ "$ENGINE" = sageinfer-thread ] && THREAD=--engine-in-thread
  PYTHONPATH=$CLIENT_PATH python3 -m sageinfer.gateway.cli serve $MODEL --load-format dummy --skip-tokenizer-init \
    --served-model-name m --port 8001 $LIMITS $THREAD > "/tmp/server-$ENGINE.log" 2>&1 &
fi
server=$!
start=$(date +%s)
for i in $(seq 1 400); do curl -sf 127.0.0.1:8001/health >/dev/null && break; kill -0 $server 2>/dev/null || break; sleep 1; done
echo "$ENGINE ready after $(( $(date +%s) - start )) s"
bench() {  # name, then bench serve's arguments
  local name=$1; shift
  PYTHONPATH=$CLIENT_PATH python3 -m sageinfer.gateway.cli bench serve --base-url http://127.0.0.1:8001 --model m \
    --vocab-size ${VOCAB:-151936} --goodput ttft:500 tpot:50 --result-file "$([ -n "${WARMUP:-}" ] && echo /tmp || echo $OUT)/$ENGINE-$name.json" "$@" 2>&1 \
    | grep -v "req/s\]" | tail -8
}
WARMUP=1 bench warmup --input-len 1024 --output-len 16 --num-prompts 32 --seed 99 > /dev/null  # compilation, not recorded
seed=0
for rate in ${RATES-16 inf}; do
  seed=$((seed + 1))  # distinct prompts per run: no run is served from an earlier run's prefix cache
  echo "== $ENGINE 1024/128 rate $rate"
  bench "rate-$rate" --input-len 1024 --output-len 128 --num-prompts ${NUM_PROMPTS:-200} --request-rate "$rate" --seed $seed
done
for mix in ${MIXES-chat-mix:500 summarize-mix:300 long-mix:300}; do
  seed=$((seed + 1))
  echo "== $ENGINE ${mix%%:*} (${mix##*:} requests, all at once)"
  bench "${mix%%:*}" --dataset "${mix%%:*}" --num-prompts "${mix##*:}" --seed $seed
done
for len in ${LONG:-}; do
  seed=$((seed + 1))
  echo "== $ENGINE $len in / 64 out, ${LONG_PROMPTS:-3} prompts one at a time"
  bench "long-$len" --input-len "$len" --output-len 64 --num-prompts ${LONG_PROMPTS:-3} --max-concurrency 1 --seed $seed
done
kill -TERM $server; wait $server; echo "server exit code $?"; tail -3 "/tmp/server-$ENGINE.log"
