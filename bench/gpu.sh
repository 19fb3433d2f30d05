#!/usr/bin/env bash
# The GPU benchmark in one command (bench/gpu.py: the seed request on full-size random weights:
# stock diffusers fp16, our engine, our engine compiled, images/s at batch 1, 2, 4, 8, peak memory).
# For a machine with torch and a GPU but without diffusers or network: run bench/wheels.sh first
# where PyPI is reachable and bring the .whl/ folder along; they are installed into /tmp/site here.
#
#   bench/gpu.sh                      # on the GPU machine; writes $OUT/gpu.json (else bench/results/)
#   bench/gpu.sh --size small --device cpu --repeats 1 --batches 1,2 --no-compile   # a dry run on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
if ! "$py" -c "import diffusers" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu.sh: diffusers is missing and there is no .whl/ (run bench/wheels.sh)" >&2; exit 2; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
"$py" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
exec "$py" bench/gpu.py --out "${OUT:-bench/results}/gpu.json" "$@"
