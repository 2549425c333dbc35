#!/usr/bin/env bash
# Creates .venv and installs sageInfer with its test dependencies.
# TORCH_SPEC picks the torch build (default: the CPU build; on a GPU machine with torch already in
# the environment, use SAGEINFER_SYSTEM_SITE=1 to reuse it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  if [ "${SAGEINFER_SYSTEM_SITE:-0}" = 1 ]; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install -q -e ".[test]"
