#!/usr/bin/env bash
# The main job end to end on data that can be had offline: set up, adversarially train a small
# XCiT on Fashion-MNIST, then evaluate its best checkpoint with APGD-CE.
# Extra arguments go to the training command (e.g. --epochs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
RUN=output/quickstart
if [ -e "$RUN/last.pth" ] || [ -e "$RUN/recovery.pth" ]; then
  RESUME=(--resume auto)   # a finished or interrupted quickstart continues instead of failing
else
  RESUME=()
fi
"$VENV/bin/python" -m advvit.train --config configs/quickstart_fashion_mnist.yaml "${RESUME[@]}" "$@"
"$VENV/bin/python" -m advvit.eval --checkpoint "$RUN/best.pth" --dataset fashion_mnist \
  --attack apgd-ce --restarts 1 --eps 0.1 --n-examples 250 --batch-size 250 \
  --output "$RUN/eval_apgd-ce.json"
