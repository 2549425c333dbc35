#!/usr/bin/env bash
# The whole test suite on a GPU machine. With two GPUs or more it runs in three parts: the engine
# tests on GPU 0 beside the server tests on GPU 1, then the tensor-parallel tests across all GPUs.
# Logs go to $OUT; the exit status is the worst part's.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# A test stuck for 4 minutes prints every thread's stack (where it hangs), and no part outlives
# PART_SECONDS: a hang costs one part, not the device call.
PYTEST="python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=240"
PART=${PART_SECONDS:-420}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
  timeout "$PART" $PYTEST tests 2>&1 | tee "$OUT/tests.log" | tail -15
  exit "${PIPESTATUS[0]}"
fi
CUDA_VISIBLE_DEVICES=0 timeout "$PART" $PYTEST tests --ignore=tests/test_server.py --ignore=tests/test_server_faults.py \
  --ignore=tests/test_tensor_parallel.py > "$OUT/tests_engine.log" 2>&1 &
engine=$!
CUDA_VISIBLE_DEVICES=1 timeout "$PART" $PYTEST tests/test_server.py tests/test_server_faults.py > "$OUT/tests_server.log" 2>&1 &
server=$!
wait $engine; rc_engine=$?
wait $server; rc_server=$?
timeout "$PART" $PYTEST tests/test_tensor_parallel.py tests/test_quantization.py tests/test_structured_output.py \
  tests/test_prompt_logprobs.py tests/test_server_faults.py -k "tensor_parallel or worker or tp2" \
  > "$OUT/tests_tp.log" 2>&1; rc_tp=$?
for part in engine server tp; do
  echo "== $part"; grep -E "^(FAILED|ERROR)" "$OUT/tests_$part.log" | head -20; tail -1 "$OUT/tests_$part.log"
done
exit $(( rc_engine > rc_server ? (rc_engine > rc_tp ? rc_engine : rc_tp) : (rc_server > rc_tp ? rc_server : rc_tp) ))
