#!/usr/bin/env bash
# The GPU benchmarks in one command. For a machine with torch and a GPU but without diffusers, the
# server's packages or network: run bench/wheels.sh first where PyPI is reachable and bring the
# .whl/ folder along; its wheels are installed into /tmp/site here.
#
#   bench/gpu.sh [engine] [ARGS]   # bench/gpu.py: the seed request on random:full weights: stock diffusers
#                                  # fp16, our engine, compiled, images/s at batch 1..8, peak memory
#   bench/gpu.sh load [ARGS]       # bench/load.py: stock, LitServe and `kolors-api serve` under Poisson
#                                  # arrivals, a burst and a lone request (1024², 25 steps)
#   bench/gpu.sh compile [ARGS]    # bench/compile_start.py: `serve --compile` ready cold and warm, and
#                                  # every batch size after ready without a stall
#   bench/gpu.sh all               # engine and load, sized for about 10 minutes of an H100/H200; `compile`
#                                  # needs a call of its own (a cold start compiles 1, 2, 4 and 8 rows)
# Results go to $OUT (else bench/results/). Dry runs on CPU:
#   bench/gpu.sh engine --size small --device cpu --repeats 1 --batches 1,2 --no-compile
#   SIZE=small DEVICE=cpu bench/gpu.sh load --size 512 --steps 4 --fractions 0.8 --seconds 5 --lone 2
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
what="engine"
case "${1:-}" in engine|load|compile|all) what="$1"; shift ;; esac
if ! "$py" -c "import diffusers, fastapi, litserve" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu.sh: diffusers or the server's packages are missing and there is no .whl/ (run bench/wheels.sh)" >&2; exit 2; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the servers the benches start import this checkout
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$py" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
out="${OUT:-bench/results}"
device="${DEVICE:-cuda}"
model="random:${SIZE:-full}"
engine() { "$py" bench/gpu.py --out "$out/gpu.json" "$@"; }
load() { "$py" bench/load.py --model "$model" --device "$device" --size 1024 --steps 25 --out "$out/load.json" "$@"; }
compile() { "$py" bench/compile_start.py --model "$model" --device "$device" --out "$out/compile_start.json" "$@"; }
case "$what" in
  engine) engine "$@" ;;
  load) load "$@" ;;
  compile) compile "$@" ;;
  all)
    engine --repeats 1 --batches 1,8 --job-batches 8 --no-large --no-vae-rows
    load --fractions 0.8 --seconds 40 --lone 3 --servers stock,litserve,ours ;;
esac
