#!/usr/bin/env bash
# What 2026-12-03 (d) built without a GPU, checked and timed in one device call (about 9 minutes on an
# H200), after carrying .whl and installing it as benchmarks/gpu_test_suite.sh's header says:
#   0. the tests of the quantized layers' warm-up and of the tiled 4-bit GEMM, on the GPU;
#   1. start-up of qwen3-8b-nvfp4 and qwen3-8b-w4a16 from an empty Triton cache with the quantized layers'
#      warm-up on and off (SAGEINFER_LINEAR_WARM_UP; NVFP4 took 100 s without it, bf16 20 s);
#   2. a decode step's 4-bit matmuls at 48-256 rows: the tiled GEMM against expansion + library GEMM;
#   3. W4A16 T2 with the tiled GEMM on (SAGEINFER_W4A16_TILED_MAX_ROWS=512) and off (14,832 tok/s; vLLM's
#      Machete 17,871). (benchmarks/results/2026-12-03d-h200-quant-vs-vllm.md)
# Key numbers go to stdout, the JSONs to $OUT. STEPS="1 2" runs only those steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=sageinfer/bench/standard
STEPS=${STEPS:-0 1 2 3}
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has 0; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_linear_warm_up.py tests/test_ops_weight_only.py \
    tests/test_quantization.py -k "warm or tiled or w4a16_layer_with_kernels" 2>&1 | tail -3
fi
if has 1; then
  for model in nvfp4 w4a16; do
    for on in 1 0; do
      SAGEINFER_LINEAR_WARM_UP=$on TRITON_CACHE_DIR=$(mktemp -d) timeout 240 python3 benchmarks/startup_compiles.py \
        --model "$S/qwen3-8b-$model" --long-prompt 4096 --mix-prompts 100 \
        --out "$OUT/startup-$model-warm-$on.json" > "$OUT/run.log" 2>&1 \
        && python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], {k: r[k] for k in (
'startup_s', 'kernel_warm_up_wait_s', 'graph_capture_s', 'start_up_compiles', 'serving_compiles')})" \
        "$OUT/startup-$model-warm-$on.json" "$model warm-up $on" || tail -5 "$OUT/run.log"
    done
  done
fi
if has 2; then
  timeout 200 python3 benchmarks/experiments/time_int4_step.py --rows 48,64,128,256 \
    --paths "tiled,tiled 128x128x128w8,tiled 128x256x64w8,expand,bf16" --out "$OUT/w4a16-rows-tiled.json"
fi
if has 3; then
  for rows in 512 0; do
    SAGEINFER_W4A16_TILED_MAX_ROWS=$rows timeout 150 python3 benchmarks/run_standard.py --model "$S/qwen3-8b-w4a16" \
      --workloads T2-decode-heavy --out "$OUT/t2-w4a16-tiled-$rows.json" > "$OUT/run.log" 2>&1 \
      && python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']['T2-decode-heavy']
print('W4A16 T2, tiled up to', sys.argv[2], 'rows:', round(r['total_tok_s']))" "$OUT/t2-w4a16-tiled-$rows.json" "$rows" \
      || tail -5 "$OUT/run.log"
  done
fi
