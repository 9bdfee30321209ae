#!/usr/bin/env bash
# Wheels for the GPU machine, fetched HERE (it has no network): run before benchmarks/gpu_check.sh.
#
#     bash benchmarks/gpu_wheels.sh          # fills .whl/ (git-ignored), about 25 MiB
#
# That machine (see /work/shared/FACTS.md) has Python 3.12 with torch, transformers, peft, triton,
# pyarrow and tensorboard, but not deepspeed, pydantic, hjson, orjson, phonenumbers, rouge-score,
# nltk nor defusedxml. gpu_check.sh installs everything here with
# `pip install --no-index --no-deps --target`, so this list is the whole closure that matters:
# the missing packages at the versions pyproject.toml pins (or this venv has), pydantic's own small
# dependencies, DeepSpeed's runtime imports, in case that Python lacks them, and the transformers and peft
# the product is tested with (that image has transformers 5.17; 5.23 needs only its huggingface_hub and tokenizers).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=.venv/bin/pip
DEST=.whl
mkdir -p "$DEST"

# Binary wheels for CPython 3.12 on manylinux x86_64. pydantic 2.14.3 needs exactly pydantic-core 2.50.4.
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$DEST" \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 \
    orjson==3.11.9 phonenumbers==9.0.43 hjson==3.1.0 nltk==3.10.4 defusedxml==0.7.1 \
    msgpack==1.2.4 py-cpuinfo==9.0.0 psutil==7.2.2 einops==0.8.2 \
    transformers==5.23.0 peft==0.21.2

# rouge-score has no wheel on PyPI (sdist only): build its pure-python wheel.
ls "$DEST"/rouge_score-0.1.2-*.whl >/dev/null 2>&1 || "$PIP" wheel -q --no-deps rouge-score==0.1.2 -w "$DEST"

# DeepSpeed builds from source; without its C++/CUDA ops it is a pure-python wheel.
ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1 ||
    DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DEST"

ls -l "$DEST"
du -sh "$DEST"
