#!/usr/bin/env bash
# One device call: kernel tests in bf16, engine check, kernel timings, standard workloads.
# Usage: bash benchmarks/gpu_session.sh "L1-single-stream,T2-decode-heavy" [extra run_standard flags]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ "${SKIP_CHECKS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_ops_paged_attention.py tests/test_ops_fused.py 2>&1 | tail -4 | tee "$OUT/ops_tests.log"
  python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s" | tee "$OUT/engine_check.log" | tail -6
  python3 benchmarks/gpu_kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -22
fi
if [ -n "${1:-}" ]; then
  w=$1; shift
  python3 benchmarks/run_standard.py --workloads "$w" --out "$OUT/standard.json" "$@" 2>&1 | grep -v "it/s\]" | tee "$OUT/standard.log" | tail -30
fi
