#!/usr/bin/env bash
# Two instances sharing one device behind the router, a multi-turn conversation workload, once per
# routing policy (round_robin, least_load, prefix over the instances' KV events): throughput and TTFT
# of first and later turns. Results in $OUT/router_<policy>.json, instance logs beside them.
# GPU (one device call, Qwen3-8B shapes, dummy weights):  bash benchmarks/router_multiturn.sh
# CPU check with the tiny model:  MODEL=tiny SESSIONS=4 TURNS=3 PREFIX=64 USER_LEN=8 ANSWER=4 bash benchmarks/router_multiturn.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${MODEL:-sageinfer/bench/standard/qwen3-8b}
SESSIONS=${SESSIONS:-64} TURNS=${TURNS:-4} PREFIX=${PREFIX:-2048} ULEN=${USER_LEN:-128} ANSWER=${ANSWER:-64}
CONCURRENCY=${CONCURRENCY:-32} VOCAB=${VOCAB:-151936} POLICIES=${POLICIES:-round_robin least_load prefix}
CLI="python3 -m sageinfer.gateway.cli"
TEXT=${TEXT:-0}; case " $POLICIES " in *" sglang "*) TEXT=1;; esac
if [ "$MODEL" = tiny ]; then
  MODEL=$(python3 -c "from sageinfer.models.tiny import default_model_path; print(default_model_path())")
  VOCAB=${VOCAB_TINY:-512}; INSTANCE_ARGS="--dtype float32 --num-gpu-blocks-override 400"
else
  INSTANCE_ARGS="--load-format dummy --gpu-memory-utilization 0.45"
  [ "$TEXT" = 1 ] || INSTANCE_ARGS="$INSTANCE_ARGS --skip-tokenizer-init"
fi
TEXT_ARGS=""; TOKENIZER_ARGS=""
if [ "$TEXT" = 1 ]; then
  MODEL=$(python3 benchmarks/word_tokenizer.py "$MODEL" "${TMPDIR:-/tmp}/router-bench-model") || exit 1
  TEXT_ARGS="--text-prompts"; TOKENIZER_ARGS="--tokenizer $MODEL"
fi
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
pids=()
urls=()
for i in 0 1; do
  port=$(free_port)
  events="{\"enable_kv_cache_events\": true, \"endpoint\": \"tcp://127.0.0.1:$(free_port)\", \"replay_endpoint\": \"tcp://127.0.0.1:$(free_port)\"}"
  $CLI serve "$MODEL" --port "$port" --served-model-name bench $INSTANCE_ARGS --kv-events-config "$events" \
    > "$OUT/instance_$i.log" 2>&1 &
  pids+=($!); urls+=("http://127.0.0.1:$port")
done
for i in 0 1; do
  for _ in $(seq 1 300); do
    curl -sf "${urls[$i]}/health" > /dev/null && break
    kill -0 "${pids[$i]}" 2>/dev/null || { echo "instance $i failed to start:"; tail -3 "$OUT/instance_$i.log"; exit 1; }
    sleep 1
  done
done
seed=0
for policy in $POLICIES; do
  seed=$((seed + 1))  # each policy its own conversations: none starts from another run's cached prefixes
  rport=$(free_port)
  if [ "$policy" = sglang ]; then
    PYTHONPATH=${SGLANG_SITE:-} python3 -m sglang_router.launch_router --worker-urls "${urls[@]}" \
      --policy cache_aware --port "$rport" --prometheus-port "$(free_port)" > "$OUT/router_$policy.log" 2>&1 &
  else
    extra=""; [ "$policy" = prefix ] && extra="--kv-events $TOKENIZER_ARGS"
    $CLI router --policy "$policy" $extra --backend "${urls[0]}" --backend "${urls[1]}" --port "$rport" \
      > "$OUT/router_$policy.log" 2>&1 &
  fi
  router=$!
  for _ in $(seq 1 60); do curl -sf "127.0.0.1:$rport/health" > /dev/null && break; sleep 0.5; done
  sleep 2  # the prefix router's first snapshots
  echo "== $policy"
  $CLI bench serve --base-url "http://127.0.0.1:$rport" --model bench --dataset multi-turn \
    --num-prompts "$SESSIONS" --turns "$TURNS" --input-len "$PREFIX" --user-len "$ULEN" --output-len "$ANSWER" \
    --max-concurrency "$CONCURRENCY" --vocab-size "$VOCAB" --seed "$seed" --result-file "$OUT/router_$policy.json" $TEXT_ARGS \
    2>&1 | grep -v "req\]"
  curl -s "127.0.0.1:$rport/metrics" | grep -E "^sageinfer_router:(routing_decisions|prefix_.*_tokens)_total" || true
  kill -TERM $router; wait $router 2>/dev/null
  for url in "${urls[@]}"; do  # the instances' own counts, cumulative over the policies so far
    curl -s "$url/metrics" | grep -E "^sageinfer:prefix_cache_(hits|queries)_total" | sed "s|^|$url |"
  done
done
kill -TERM "${pids[@]}"; wait 2>/dev/null
