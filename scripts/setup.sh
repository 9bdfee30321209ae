#!/usr/bin/env bash
# Create the project-local .venv (once) and install kubetune with everything it needs.
# torch from PyPI is a CUDA build that also runs on CPU; pip's cache makes reinstalls cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
# DeepSpeed compiles nothing at install (DS_BUILD_OPS=0) and must see the torch installed above.
.venv/bin/python -c "import deepspeed" 2>/dev/null ||
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation deepspeed==0.19.8
.venv/bin/python -m pip install -q -e '.[all]'
