#!/usr/bin/env bash
# Download, here (with PyPI), the wheels that bench/gpu.sh installs on a GPU machine that has torch but
# no diffusers and no network. They go to .whl/ (git-ignored); carry that folder along with the checkout.
# The GPU image's own huggingface_hub, tokenizers, safetensors, sentencepiece, numpy and Pillow serve.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 transformers==5.24.0 regex==2026.11.19 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 python-dotenv==1.2.4
ls -l .whl
