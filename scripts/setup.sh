#!/usr/bin/env bash
# Creates .venv and installs falconet with its test extras.
# PyTorch: on a machine without an NVIDIA GPU we install the CPU build first, so that the
# range in pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_VERSION=${FALCONET_TORCH_VERSION:-2.13.0}

if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch>=2.5,<3"          # the CUDA build from PyPI
  else
    # A CPU wheel on local disk (find-links) first; else PyTorch's CPU index.
    "$VPY" -m pip install -q --no-index "torch==${TORCH_VERSION}" 2>/dev/null \
      || "$VPY" -m pip install -q "torch==${TORCH_VERSION}" \
           --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
"$VPY" -m pip install -q -e ".[test]"
"$VPY" -c "import torch, falconet; print('falconet', falconet.__version__, 'torch', torch.__version__)"
