#!/usr/bin/env bash
# Create .venv/ at the repository root and install minicpm-finetune with its training stack.
# torch is installed first and pinned, so nothing pulls a multi-GB build you did not ask for:
# set TORCH_SPEC (for example "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124")
# to choose the build for your hardware.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install --quiet -e '.[train,dev]'
# GGUF export and llama-cpp-python, which builds llama.cpp from source (about 4 minutes on 2 idle cores, once:
# pip caches the wheel); the multimodal library is not built, and the build uses every core.
CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    .venv/bin/python -m pip install --quiet -e '.[export]'
