#!/usr/bin/env bash
# Create (or reuse) a virtualenv with the CPU build of torch and install vittle_fast into it with
# the dev extras, compiling the C++ extension. Idempotent: re-running only rebuilds what changed.
#   VENV=path        where the environment lives (default: .venv in the repository)
#   TORCH_VERSION=v  torch to install first (default 2.13.0, the CPU wheel; 2.14.1 is the CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
echo "[setup] installing torch==${TORCH_VERSION:-2.13.0} and vittle_fast[dev] into $VENV"
"$VENV/bin/python" -m pip install -q -U pip setuptools wheel
# torch first and pinned: a bare 'torch' requirement would pull a multi-GB CUDA build. numpy with it:
# the extension build imports torch, which warns "Failed to initialize NumPy" when numpy is missing.
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" "numpy>=1.26"
# No build isolation: the C++ extension must compile against the torch installed above.
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[dev]"
"$VENV/bin/python" -m vittle_fast.ops --check
