#!/usr/bin/env bash
# Build the torch-xla environment that tests/test_xla.py runs in (CI and developers alike).
#
#   scripts/setup_xla_env.sh [VENV_DIR]        # default: $ADVVIT_XLA_VENV, else .venv-xla
#
# torch-xla wheels exist only up to 2.9.0 and each needs the torch of the same minor version, so
# this environment cannot be the project's main one (which tracks newer torch). With
# PJRT_DEVICE=CPU torch-xla runs for real on the CPU, which is what the tests use.
#
# Idempotent: a venv that already imports the pinned versions and the project is left as it is
# (a few seconds); anything missing or at another version is (re)installed. torch is pinned with
# a constraint file while the project's other dependencies go in, so none of them can pull a
# different torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${ADVVIT_XLA_VENV:-$ROOT/.venv-xla}}"
PYTHON_BIN="${PYTHON:-python3}"

TORCH_VERSION="2.9.0"
TORCHVISION_VERSION="0.24.0"
TORCH_XLA_VERSION="2.9.0"

# The checks the environment has to pass; also the fast path of a second run.
CHECK='
import importlib.metadata as md, sys
want = {"torch": "'"$TORCH_VERSION"'", "torchvision": "'"$TORCHVISION_VERSION"'",
        "torch_xla": "'"$TORCH_XLA_VERSION"'"}
for name, version in want.items():
    have = md.version(name.replace("_", "-")).split("+")[0]
    if have != version:
        sys.exit(f"{name} {have} != {version}")
import advvit, timm, yaml, pytest, torch_xla  # noqa: E401,F401
import advvit.accel
if not advvit.__file__.startswith("'"$ROOT"'"):
    sys.exit(f"advvit is imported from {advvit.__file__}, not from '"$ROOT"'")
# advvit goes in without its dependency list, so nothing else holds the others to its bounds
# (torchvision alone would bring a Pillow that advvit excludes).
from packaging.requirements import Requirement
for line in md.requires("advvit") or []:
    req = Requirement(line)
    if req.marker is not None or req.name in ("torch", "torchvision"):
        continue
    have = md.version(req.name)
    if not req.specifier.contains(have, prereleases=True):
        sys.exit(f"{req.name} {have} does not meet advvit'"'"'s requirement {req}")
'

if [ -x "$VENV/bin/python" ] && PJRT_DEVICE=CPU "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
    echo "setup_xla_env: $VENV is ready (torch $TORCH_VERSION, torch-xla $TORCH_XLA_VERSION)"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_xla_env: creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)

# advvit's own runtime requirements (pyproject.toml, the one list), less torch and torchvision,
# which are pinned here. They are constraints from the first install on, so torchvision cannot
# bring in a Pillow that advvit excludes.
DEPS="$("$PYTHON_BIN" - "$ROOT/pyproject.toml" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.match(r"[A-Za-z0-9_.-]+", d).group(0) not in ("torch", "torchvision")))
PY
)"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
torchvision==$TORCHVISION_VERSION
torch-xla==$TORCH_XLA_VERSION
$DEPS
EOF

echo "setup_xla_env: installing torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION," \
     "torch-xla $TORCH_XLA_VERSION (~7 GB the first time)"
"${PIP[@]}" -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    "torch-xla==$TORCH_XLA_VERSION"

# The project itself without its dependency list (which would let pip reconsider torch), then its
# runtime and test dependencies under the same torch constraint.
"${PIP[@]}" --no-deps -e "$ROOT"
# shellcheck disable=SC2086
"${PIP[@]}" -c "$CONSTRAINTS" $DEPS "pytest>=7" "hypothesis>=6"

if ! PJRT_DEVICE=CPU "$VENV/bin/python" -c "$CHECK"; then
    echo "setup_xla_env: $VENV failed its check" >&2
    exit 1
fi
echo "setup_xla_env: $VENV is ready"
