#!/usr/bin/env bash
# Create the project-local .venv (once) and install kubetune with everything it needs.
# torch from PyPI is a CUDA build that also runs on CPU; pip's cache makes reinstalls cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[all]'
