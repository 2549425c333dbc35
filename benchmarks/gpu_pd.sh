#!/usr/bin/env bash
# One device call for prefill/decode separation on one GPU: the transfer bandwidth of a 32K-token
# prompt's KV (Qwen3-8B shapes), then the serving benchmark (1024 in / 128 out) against one instance
# with 0.9 of the card, and against a prefill and a decode instance with 0.45 each behind
# `sageinfer proxy` (CONNECTOR, default DeviceIpcConnector), at RATES and then the long-prompt mix
# (one request in ten 8K-32K tokens) at MIX_RATE. LOCAL_PREFILL=N: prompts of at most N tokens skip the
# prefill instance (the proxy's --max-local-prefill-tokens). Carry .whl for the server's packages. Logs
# and JSON in $OUT.
# ENGINE=vllm serves vLLM instead (same proxy, client and prompts; its NixlConnector, kv_both): vLLM's
# bundle installed in /tmp/site as ../shared/bench/vllm-on-device.md says, plus NIXL (nixl 1.5.1 and
# nixl-cu13 1.5.1, 59 MB: one carry of its own, installed into /tmp/site the same way), with
# PYTHONPATH=/tmp/site:$PWD and WAIT_UP=400 (vLLM takes minutes to start). Not yet run. The wheels:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --implementation cp --no-deps -d .peer/nixl "nixl==1.5.1" "nixl-cu13==1.5.1"
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=sageinfer/bench/standard/qwen3-8b
RATES=${RATES-8 16}
NUM=${NUM_PROMPTS:-150}
CONNECTOR=${CONNECTOR:-DeviceIpcConnector}
ENGINE=${ENGINE:-sageinfer}
echo "/dev/shm: $(df -h /dev/shm | tail -1)"
if [ "$ENGINE" = sageinfer ]; then
  timeout ${BANDWIDTH_SECONDS:-120} python3 benchmarks/pd_transfer_bandwidth.py --connector $CONNECTOR --repeats ${REPEATS:-3} --result-file "$OUT/pd_bandwidth.json" 2>&1 | tail -5
fi
serve() {  # port, memory share, extra flags...
  local port=$1 share=$2; shift 2
  if [ "$ENGINE" = vllm ]; then  # each instance its own NIXL side channel
    VLLM_NIXL_SIDE_CHANNEL_PORT=$((port + 1000)) python3 -m vllm.entrypoints.openai.api_server \
      --model .peer/bench/qwen3-8b --load-format dummy --skip-tokenizer-init --served-model-name m --port "$port" \
      --max-num-seqs 256 --max-num-batched-tokens 16384 --gpu-memory-utilization "$share" "$@" \
      > "$OUT/server_$port.log" 2>&1 &
    return
  fi
  python3 -m sageinfer.gateway.cli serve $MODEL --load-format dummy --skip-tokenizer-init --served-model-name m \
    --port "$port" --max-num-seqs 256 --max-num-batched-tokens 16384 --gpu-memory-utilization "$share" "$@" \
    > "$OUT/server_$port.log" 2>&1 &
}
wait_up() { for i in $(seq 1 ${WAIT_UP:-180}); do curl -sf "127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
bench() {  # url, tag
  python3 -m sageinfer.gateway.cli bench serve --base-url "$1" --model m --input-len 1024 --output-len 16 \
    --num-prompts 24 --vocab-size 151936 --seed 99 > /dev/null 2>&1  # warm-up, not recorded
  local seed=0
  for rate in $RATES; do
    seed=$((seed + 1))
    echo "== $2, request rate $rate"
    timeout 120 python3 -m sageinfer.gateway.cli bench serve --base-url "$1" --model m --input-len 1024 \
      --output-len 128 --num-prompts "$NUM" --request-rate "$rate" --vocab-size 151936 --seed "$seed" \
      --result-file "$OUT/pd_serve_${2}_$rate.json" 2>&1 | grep -E "throughput|TTFT|TPOT|failed" | head -8
  done
  if [ -n "${MIX_RATE:-}" ]; then
    echo "== $2, long-mix at $MIX_RATE req/s"
    timeout 200 python3 -m sageinfer.gateway.cli bench serve --base-url "$1" --model m --dataset long-mix \
      --num-prompts "${MIX_PROMPTS:-150}" --request-rate "$MIX_RATE" --vocab-size 151936 --seed 7 \
      --result-file "$OUT/pd_serve_${2}_long-mix.json" 2>&1 | grep -E "throughput|TTFT|TPOT|failed" | head -8
  fi
}
if [ "${SKIP_SINGLE:-0}" != 1 ]; then
  serve 8100 0.9; single=$!
  wait_up 8100 && bench http://127.0.0.1:8100 single || tail -5 "$OUT/server_8100.log"
  kill -TERM $single; wait $single
fi
KV="{\"kv_connector\": \"$CONNECTOR\", \"kv_role\": "
if [ "$CONNECTOR" = SharedMemoryConnector ] && [ "$(df --output=avail -k /dev/shm | tail -1)" -lt 20000000 ]; then
  KV='{"kv_connector": "SharedMemoryConnector", "kv_connector_extra_config": {"shm_dir": "/tmp"}, "kv_role": '
fi
ROLES="kv_producer kv_consumer"
[ "$ENGINE" = vllm ] && KV='{"kv_connector": "NixlConnector", "kv_role": ' && ROLES="kv_both kv_both"
set -- $ROLES
serve 8201 0.45 --kv-transfer-config "$KV\"$1\"}"; p=$!
sleep ${START_GAP:-20}  # one start at a time: each profiles the memory the other leaves
serve 8202 0.45 --kv-transfer-config "$KV\"$2\"}"; d=$!
wait_up 8201 && wait_up 8202 || { tail -5 "$OUT"/server_820*.log; }
python3 -m sageinfer.gateway.cli proxy --prefill http://127.0.0.1:8201 --decode http://127.0.0.1:8202 --port 8200 \
  --max-local-prefill-tokens "${LOCAL_PREFILL:-0}" \
  > "$OUT/proxy.log" 2>&1 & proxy=$!
wait_up 8200 && bench http://127.0.0.1:8200 pd
curl -s 127.0.0.1:8201/metrics | grep -E "^sageinfer:kv_transfer_send"
curl -s 127.0.0.1:8202/metrics | grep -E "^sageinfer:kv_transfer"
curl -s 127.0.0.1:8200/metrics | grep -E "^sageinfer_pd_proxy"
kill -TERM $proxy $p $d; wait
