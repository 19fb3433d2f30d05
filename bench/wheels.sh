#!/usr/bin/env bash
# Download, here (with PyPI), the wheels that bench/gpu.sh installs on a GPU machine that has torch but
# no diffusers, no server packages and no network. They go to .whl/ (git-ignored); carry that folder
# along with the checkout. The GPU image's own huggingface_hub, tokenizers, safetensors, sentencepiece,
# numpy and Pillow serve.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
platform=(--only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# the engine's, pinned, without their dependencies (the GPU image has those)
"$py" -m pip download -q --no-deps "${platform[@]}" -d .whl \
  diffusers==0.42.1 transformers==5.24.0 regex==2026.11.19 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 python-dotenv==1.2.4
# the API server's and the LitServe peer's (bench/load.py), with their dependencies: none needs torch
"$py" -m pip download -q "${platform[@]}" -d .whl/server \
  'fastapi>=0.115' 'uvicorn>=0.30' 'prometheus-client>=0.20' 'rich>=13' 'limits>=4.0' \
  'standardwebhooks>=1.1' 'httpx>=0.27' litserve pydantic==2.14.4 pydantic-core==2.50.5 \
  pydantic-settings==2.16.3
# one copy of each: the pinned ones win
for f in .whl/server/*.whl; do
  name=$(basename "$f" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
  ls .whl/*.whl 2>/dev/null | xargs -n1 basename | cut -d- -f1 | tr '[:upper:]' '[:lower:]' | grep -qx "$name" \
    || mv "$f" .whl/
done
rm -rf .whl/server
ls -l .whl
