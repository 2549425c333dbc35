#!/usr/bin/env bash
# The whole test suite on a GPU machine. With two GPUs or more it runs in three parts: the engine
# tests on GPU 0 beside the server tests on GPU 1, then the tensor-parallel tests across all GPUs.
# Logs go to $OUT; the exit status is the worst part's.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# A test stuck for 4 minutes prints every thread's stack (where it hangs), and no part outlives
# PART_SECONDS: a hang costs one part, not the device call. The limit interrupts pytest (SIGINT), so a
# part cut short still lists its failures; -v logs each test as it ends.
PYTEST="python3 -m pytest -v -rfE --tb=short --durations=20 -p no:cacheprovider -o faulthandler_timeout=240"
PART=${PART_SECONDS:-420}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
  timeout -s INT -k 20 "$PART" $PYTEST tests 2>&1 | tee "$OUT/tests.log" | tail -15
  exit "${PIPESTATUS[0]}"
fi
CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 20 "$PART" $PYTEST tests --ignore=tests/test_server.py --ignore=tests/test_server_faults.py \
  --ignore=tests/test_tensor_parallel.py > "$OUT/tests_engine.log" 2>&1 &
engine=$!
CUDA_VISIBLE_DEVICES=1 timeout -s INT -k 20 "$PART" $PYTEST tests/test_server.py tests/test_server_faults.py > "$OUT/tests_server.log" 2>&1 &
server=$!
wait $engine; rc_engine=$?
wait $server; rc_server=$?
timeout -s INT -k 20 "$PART" $PYTEST tests/test_tensor_parallel.py tests/test_quantization.py tests/test_structured_output.py \
  tests/test_prompt_logprobs.py tests/test_server_faults.py -k "tensor_parallel or worker or tp2" \
  > "$OUT/tests_tp.log" 2>&1; rc_tp=$?
for part in engine server tp; do
  echo "== $part"; grep -E "^(FAILED|ERROR)" "$OUT/tests_$part.log" | head -20; grep -E "^=+ .*(passed|failed|error)" "$OUT/tests_$part.log" | tail -1 "$OUT/tests_$part.log"
done
exit $(( rc_engine > rc_server ? (rc_engine > rc_tp ? rc_engine : rc_tp) : (rc_server > rc_tp ? rc_server : rc_tp) ))
