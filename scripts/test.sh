#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers, each test file whole on one of them (a file's module fixtures, servers and ports stay
# together): 15 instead of 27 minutes on a 2-core machine. SAGEINFER_TEST_WORKERS=0 runs in one process.
# One torch thread a worker: two workers with two threads each on two cores ran 10-12% slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -n "${SAGEINFER_TEST_WORKERS:-2}" --dist loadfile tests "$@"
