#!/usr/bin/env bash
# One device call: serve Qwen3-8B shapes (dummy weights) and load it with `sageinfer bench serve` at
# several request rates; then P1 with prefix caching off. Carry .whl when the server's packages
# (fastapi, uvicorn, pyzmq, msgspec) are missing on the machine. SERVE_ARGS adds server flags (e.g.
# --block-size 16, --engine-in-thread); RATES picks the request rates.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import fastapi, uvicorn, zmq, msgspec" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
python3 -m sageinfer.gateway.cli serve sageinfer/bench/standard/qwen3-8b --load-format dummy --skip-tokenizer-init \
  --served-model-name qwen3-8b-dummy --port 8000 --max-num-seqs 1024 --max-num-batched-tokens 16384 ${SERVE_ARGS:-} \
  > "$OUT/server.log" 2>&1 &
server=$!
for i in $(seq 1 240); do curl -sf 127.0.0.1:8000/health >/dev/null && break; sleep 1; done
grep -E "KV cache" "$OUT/server.log" | tail -2
# Warm-up (kernel compilation for these shapes), not recorded.
python3 -m sageinfer.gateway.cli bench serve --base-url http://127.0.0.1:8000 --model qwen3-8b-dummy \
  --input-len 1024 --output-len 16 --num-prompts 32 --vocab-size 151936 --seed 99 > /dev/null 2>&1
seed=0
for rate in ${RATES:-4 8 16 inf}; do
  seed=$((seed + 1))  # distinct prompts per run: no run is served from an earlier run's prefix cache
  echo "== request rate $rate (seed $seed)"
  python3 -m sageinfer.gateway.cli bench serve --base-url http://127.0.0.1:8000 --model qwen3-8b-dummy \
    --input-len 1024 --output-len 128 --num-prompts 200 --request-rate "$rate" --vocab-size 151936 --seed "$seed" \
    --goodput ttft:500 tpot:50 --result-file "$OUT/serve_rate_$rate.json" 2>&1 | grep -v "req/s\]"
done
curl -s 127.0.0.1:8000/metrics | grep -E "^sageinfer:(kv_cache|num_requests|prefix_cache_hit|num_preemptions)" 
kill -TERM $server; wait $server; echo "server exit code $?"
if [ "${P1_NOCACHE:-1}" = 1 ]; then
  python3 benchmarks/run_standard.py --workloads P1-shared-prefix --no-enable-prefix-caching \
    --out "$OUT/p1_nocache.json" 2>&1 | grep -v "it/s\]" | tail -3
fi
