#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (continuous batching with -np slots, its prompt
# cache) from the llama.cpp sources vendored in the llama-cpp-python sdist of the version
# installed in the venv, so the anchor is the same llama.cpp the other benchmarks call
# through llama-cpp-python. llama-cpp-python's own server runs one request at a time and
# is no anchor for concurrency.
#
#   bash benchmarks/build_llama_server.sh [OUT_DIR]     # ~8 min on 2 cores
#
# Prints the path of the built binary. The sdist comes from pip's configured index
# (PIP_INDEX_URL / pip.conf choose another). Not part of `make test`.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/.bench_cache/llama-server}"
py="${PYTHON:-$here/.venv/bin/python}"
version="$("$py" -c 'import llama_cpp; print(llama_cpp.__version__)')"
binary="$out/build/bin/llama-server"

if [[ -x "$binary" && -f "$out/VERSION" && "$(cat "$out/VERSION")" == "$version" ]]; then
    echo "$binary"
    exit 0
fi

mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
rm -rf "$out/src" && cp -r "$src" "$out/src"

# CPU only, no curl (no network to fetch models from), native ISA like the wheel's build.
cmake -S "$out/src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$out/build" --target llama-server -j "$(nproc)" >&2
echo "$version" > "$out/VERSION"
echo "$binary"
