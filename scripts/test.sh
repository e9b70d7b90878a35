#!/usr/bin/env bash
# The test command: sets up (idempotent), runs the test suite on the CPU, then the torch-xla tests
# in their own environment (skip those with SKIP_XLA=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pytest -q "$@"
if [ "${SKIP_XLA:-0}" != 1 ]; then
  bash scripts/setup_xla_env.sh
  bash scripts/run_xla_tests.sh -q
fi
