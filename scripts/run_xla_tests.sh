#!/usr/bin/env bash
# Run the torch-xla tests for real on the CPU (PJRT_DEVICE=CPU) in the XLA environment.
#
#   scripts/run_xla_tests.sh [pytest args...]
#
# The environment is $ADVVIT_XLA_VENV, else .venv-xla; build it first with
# scripts/setup_xla_env.sh (CI runs both). Fails, rather than skips, when torch_xla is missing
# there: in this script a skipped XLA test would hide a broken environment.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ADVVIT_XLA_VENV:-$ROOT/.venv-xla}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "run_xla_tests: no environment at $VENV; run scripts/setup_xla_env.sh first" >&2
    exit 2
fi

cd "$ROOT"
# CPU unless told otherwise: on a TPU host, `PJRT_DEVICE=TPU scripts/run_xla_tests.sh -k two_xla`
# runs the multi-device test, which the CPU cannot (see docs/architecture.md, accel).
export PJRT_DEVICE="${PJRT_DEVICE:-CPU}"
# The tests check that torch_xla really is there instead of skipping (see tests/test_xla.py).
export ADVVIT_REQUIRE_XLA=1
exec "$VENV/bin/python" -m pytest tests/test_xla.py -p no:cacheprovider "$@"
