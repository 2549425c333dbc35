#!/usr/bin/env bash
# The whole test suite on a GPU machine, in two groups of about 7 minutes on two GPUs (one device call
# each; GROUP=1 or GROUP=2, default both):
#   group 1: the engine tests, split in two halves by file, one half per GPU
#   group 2: the server tests on GPU 0 beside the router and PD-serving tests on GPU 1, then the
#            tensor-parallel tests across all GPUs
# With one GPU the parts of a group run one after the other; GROUP=shared runs the whole suite as nine
# parts side by side on GPU 0 instead (one call of about 6 minutes on an H200: the tests' models are
# tiny and most size their KV cache explicitly, so they share one card). Logs go to $OUT; the exit
# status is the worst part's.
# The GPU machine lacks the test and server packages: carry .whl (scripts/device_wheels.sh) and
# install it to /tmp/site first (the script's header says how).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# A test stuck for 4 minutes prints every thread's stack (where it hangs), and no part outlives
# PART_SECONDS: a hang costs one part, not the device call. The limit interrupts pytest (SIGINT), so a
# part cut short still lists its failures; -v logs each test as it ends.
PYTEST="python3 -m pytest -v -rfE --tb=short --durations=20 -p no:cacheprovider -o faulthandler_timeout=240"
PART=${PART_SECONDS:-420}
GROUP=${GROUP:-all}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
SERVING="tests/test_server.py tests/test_server_faults.py"
ROUTING="tests/test_router.py tests/test_pd_serving.py"
ALL_ENGINE=$(ls tests/test_*.py | grep -v -E "test_(server|server_faults|router|pd_serving|tensor_parallel)\.py")
# The slowest files on a GPU first, so that dealing in turn spreads them over the parts.
SLOW="tests/test_ops_fp4.py tests/test_hopper_attention.py tests/test_quantization.py tests/test_cli.py
tests/test_ops_gemv.py tests/test_llm_compressor.py tests/test_generation_vs_transformers.py
tests/test_ops_prefill_attention.py tests/test_ops_paged_attention.py"
ENGINE=$( (for f in $SLOW; do echo "$ALL_ENGINE" | grep -x "$f"; done; echo "$ALL_ENGINE" | grep -v -x -F "$(echo $SLOW | tr ' ' '\n')") )
# The engine's files dealt out in turn:
# two parts for two GPUs, six when the parts share one (GROUP=shared; with four, the part that drew both the
# quantization and the GEMV tests ran 415 s on an H200 while the others ended in 270-300 s; with five, two parts
# passed 420 s on an H100 on 12-06).
deal() { echo "$ENGINE" | awk -v n="$1" -v i="$2" 'NR % n == i'; }
if [ "$GROUP" = shared ]; then
  ENGINE_A=$(deal 6 1); ENGINE_B=$(deal 6 2); ENGINE_C=$(deal 6 3); ENGINE_D=$(deal 6 4); ENGINE_E=$(deal 6 5)
  ENGINE_F=$(deal 6 0)
else
  ENGINE_A=$(deal 2 1); ENGINE_B=$(deal 2 0)
fi
# ONLY="tests/a.py tests/b.py" runs just those files, as one part (e.g. what a cut-short part left).
worst=0
part() {  # name, gpu, tests... (in the background when there are two GPUs)
  local name=$1 gpu=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout -s INT -k 20 "$PART" $PYTEST "$@" > "$OUT/tests_$name.log" 2>&1
}
pair() {  # two parts side by side on two GPUs, or one after the other
  if [ "$gpus" -ge 2 ]; then
    part "$1" 0 $2 & local first=$!
    part "$3" 1 $4 & local second=$!
    wait $first; local a=$?; wait $second; local b=$?
  else
    part "$1" 0 $2; local a=$?; part "$3" 0 $4; local b=$?
  fi
  worst=$(( worst > a ? worst : a )); worst=$(( worst > b ? worst : b ))
}
ran=""
if [ -n "${ONLY:-}" ]; then
  part only 0 $ONLY; worst=$?; ran=only; GROUP=none
fi
if [ "$GROUP" = shared ]; then
  part engine_a 0 $ENGINE_A & p1=$!
  part engine_b 0 $ENGINE_B & p2=$!
  part engine_c 0 $ENGINE_C & p6=$!
  part engine_d 0 $ENGINE_D & p7=$!
  part engine_e 0 $ENGINE_E & p8=$!
  part engine_f 0 $ENGINE_F & p9=$!
  part routing 0 tests/test_router.py tests/test_tensor_parallel.py & p3=$!
  part server 0 $SERVING & p4=$!
  part pd 0 tests/test_pd_serving.py & p5=$!  # its instances start slowly on a GPU: a part of its own
  for p in $p1 $p2 $p6 $p7 $p8 $p9 $p3 $p4 $p5; do wait $p; rc=$?; worst=$(( worst > rc ? worst : rc )); done
  ran="engine_a engine_b engine_c engine_d engine_e engine_f routing server pd"
fi
if [ "$GROUP" = 1 ] || [ "$GROUP" = all ]; then
  pair engine_a "$ENGINE_A" engine_b "$ENGINE_B"; ran="$ran engine_a engine_b"
fi
if [ "$GROUP" = 2 ] || [ "$GROUP" = all ]; then
  pair server "$SERVING" routing "$ROUTING"; ran="$ran server routing"
  if [ "$gpus" -ge 2 ]; then
    timeout -s INT -k 20 "$PART" $PYTEST tests/test_tensor_parallel.py tests/test_quantization.py \
      tests/test_structured_output.py tests/test_prompt_logprobs.py tests/test_server_faults.py \
      -k "tensor_parallel or worker or tp2" > "$OUT/tests_tp.log" 2>&1
    rc=$?; worst=$(( worst > rc ? worst : rc )); ran="$ran tp"
  fi
fi
for name in $ran; do
  echo "== $name"; grep -E "^(FAILED|ERROR)" "$OUT/tests_$name.log" | head -20
  if grep -q "KeyboardInterrupt" "$OUT/tests_$name.log"; then  # pytest's summary then reads like a whole part's
    echo "CUT SHORT after $PART s: the tests after the last one logged did not run"; worst=$(( worst > 1 ? worst : 1 ))
  fi
  grep -E "^=+ .*(passed|failed|error)" "$OUT/tests_$name.log" | tail -1
done
exit $worst
