#!/usr/bin/env bash
# Creates .venv and installs falconet; `setup.sh test` adds the test extras (transformers,
# gguf, llama-cpp-python built from source, triton) and llama.cpp's converter.
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
    # A CPU wheel on local disk (pip's find-links) first, its small pure-Python
    # dependencies from the package index; else FALCONET_TORCH_INDEX_URL or pip's index.
    WHEELS=$(mktemp -d)
    if "$VPY" -m pip download -q --no-index --no-deps "torch==${TORCH_VERSION}" -d "$WHEELS" 2>/dev/null \
        && ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1; then
      "$VPY" -m pip install -q "$WHEELS"/torch-*.whl
    elif [ -n "${FALCONET_TORCH_INDEX_URL:-}" ]; then
      # PyTorch's CPU wheel index (or a mirror of it), named by the user; the small
      # dependencies still come from pip's configured index.
      "$VPY" -m pip install -q "torch==${TORCH_VERSION}" --extra-index-url "$FALCONET_TORCH_INDEX_URL"
    else
      # pip's configured index (PIP_INDEX_URL / pip.conf): a CPU build where it serves one.
      "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
    fi
    rm -rf "$WHEELS"
  fi
fi

if [ "${1:-}" != "test" ]; then
  "$VPY" -m pip install -q -e .
  "$VPY" -c "import torch, falconet; print('falconet', falconet.__version__, 'torch', torch.__version__)"
  exit 0
fi

# llama.cpp's HF->GGUF converter ships only in llama-cpp-python's source distribution
# (vendor/llama.cpp); the interop tests run it from .cache/llama.cpp. The same sdist is
# then built for the test extras (pip's cache serves the second download).
LLAMA_CPP_VERSION=0.3.36
if [ ! -f .cache/llama.cpp/convert_hf_to_gguf.py ]; then
  mkdir -p .cache/sdist
  "$VPY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==${LLAMA_CPP_VERSION}" -d .cache/sdist
  tar -xzf ".cache/sdist/llama_cpp_python-${LLAMA_CPP_VERSION}.tar.gz" -C .cache/sdist \
    "llama_cpp_python-${LLAMA_CPP_VERSION}/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-${LLAMA_CPP_VERSION}/vendor/llama.cpp/conversion" \
    "llama_cpp_python-${LLAMA_CPP_VERSION}/vendor/llama.cpp/gguf-py"
  rm -rf .cache/llama.cpp
  mv ".cache/sdist/llama_cpp_python-${LLAMA_CPP_VERSION}/vendor/llama.cpp" .cache/llama.cpp
  rm -rf ".cache/sdist/llama_cpp_python-${LLAMA_CPP_VERSION}"
fi
# The web app's end-to-end tests (tests/test_web_e2e.py) drive Debian's chromium package
# through Playwright: installed with apt where apt and root (or sudo without a password)
# are at hand and the binary is missing; elsewhere those tests skip, saying why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  APT=""
  if [ "$(id -u)" = 0 ]; then APT="apt-get"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then APT="sudo -n apt-get"
  fi
  if [ -n "$APT" ]; then
    $APT install -y -q chromium >/dev/null || { $APT update -q >/dev/null && $APT install -y -q chromium >/dev/null; } \
      || echo "setup.sh: could not install chromium; the web app's browser tests will skip" >&2
  else
    echo "setup.sh: chromium is missing and apt needs root; the web app's browser tests will skip" >&2
  fi
fi
# Only the text library is needed (no multimodal part): a shorter build.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
"$VPY" -m pip install -q -e ".[test]"
"$VPY" -c "import torch, falconet; print('falconet', falconet.__version__, 'torch', torch.__version__)"
