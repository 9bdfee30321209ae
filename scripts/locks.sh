#!/usr/bin/env bash
# Regenerate the images' hashed locks from pyproject.toml's pins (run after changing a pin):
#
#   pip install uv && bash scripts/locks.sh
#
#   locks/operator.txt            the operator image: the base dependencies, [operator] and [api]
#   locks/trainer.txt             the trainer image: the base dependencies, [trainer] and [serve] (so [data]),
#                                 torch from PyPI (its CUDA build, which runs on CPU too), without deepspeed:
#   locks/trainer-deepspeed.txt   deepspeed alone, an sdist built after torch (--no-build-isolation)
#
# For the images' Python (3.11) on Linux x86_64; the Dockerfiles install them with --require-hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv > /dev/null || { echo "locks: needs uv (pip install uv)" >&2; exit 2; }
compile() { uv pip compile -q --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --custom-compile-command "bash scripts/locks.sh" "$@"; }
compile pyproject.toml --extra operator --extra api -o locks/operator.txt
compile pyproject.toml --extra trainer --extra serve --no-emit-package deepspeed -o locks/trainer.txt
grep -o '"deepspeed==[^"]*"' pyproject.toml | tr -d '"' | compile --no-deps - -o locks/trainer-deepspeed.txt
