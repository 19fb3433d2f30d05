"""`serve --compile` from start to steady state: ready time cold and warm, and no stall after ready.

Starts `kolors-api serve --compile` twice on one `--compile-cache` (a cold start that compiles, then
a warm restart that loads the kernels), and after each `/readyz`:

- a lone request, three times (the steady state of one request);
- bursts of 2, 3, 5 and 8 concurrent requests (each on its own connection): batch sizes that pad
  to 2, 4, 8 and 8 rows. None may compile after ready: each burst's slowest answer is compared
  with its steady state (the same burst again), and the ratio must stay under 2.

    python bench/compile_start.py --model random:full --device cuda          # bench/gpu.sh compile
    .venv/bin/python bench/compile_start.py --size 512 --steps 4             # tiny on CPU (slow compile)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import body, wait_up  # noqa: E402  (bench/ is not a package)
from load import burst, http_send  # noqa: E402
from serving import KEY, free_port  # noqa: E402


def start(args: argparse.Namespace, model: str, work: Path, cache: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    env = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": KEY, "KOLORS_API_LOG_LEVEL": "info"}
    cmd = [sys.executable, "-m", "kolors_api.cli", "serve", "--port", str(port), "--model", model,
           "--data-dir", str(work), "--compile", "--compile-shapes", f"{args.size}x{args.size}",
           "--compile-cache", str(cache), "--max-batch-images", str(args.max_batch),
           *(["--device", args.device] if args.device else [])]
    started = time.perf_counter()
    log = (work / "serve.log").open("ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc, "/readyz", timeout=3600)
    return proc, url, time.perf_counter() - started


def after_ready(url: str, size: int, steps: int) -> dict[str, Any]:
    send = http_send(url, "/v1/kolors", lambda i: body(i, size, steps))
    out: dict[str, Any] = {}
    lone = []
    for _ in range(3):
        a = send(0)
        lone.append(a.done - a.sent)
    out["lone_s"] = lone
    for n in (2, 3, 5, 8):
        first = max(a.done - a.sent for a in burst(n, send))
        again = max(a.done - a.sent for a in burst(n, send))
        out[f"burst_{n}"] = {"first_s": first, "steady_s": again, "ratio": first / again}
        print(f"    burst of {n}: first {first:.2f}s, steady {again:.2f}s (x{first / again:.2f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="tiny (default, built here), a folder, random:small|full")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default="bench/results/compile_start.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kolors-compile-bench-"))
    cache = work / "compile-cache"
    model = args.model
    if model in (None, "tiny"):
        from kolors_api.engine import build_tiny_model

        model = str(build_tiny_model(work / "tiny"))
    result: dict[str, Any] = {"model": args.model or "tiny", "size": args.size, "steps": args.steps}
    for run in ("cold", "warm"):
        proc, url, ready = start(args, model, work / run, cache)
        print(f"  {run} start: ready after {ready:.1f}s", flush=True)
        try:
            result[run] = {"ready_s": ready, **after_ready(url, args.size, args.steps)}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
    print(f"\n--compile, {args.size}x{args.size}, {args.steps} steps, model {result['model']}, cache {cache}")
    print(f"{'start':6} {'ready s':>8} {'lone s':>7} " + " ".join(f"{f'burst {n} x':>10}" for n in (2, 3, 5, 8)))
    for run in ("cold", "warm"):
        r = result[run]
        print(f"{run:6} {r['ready_s']:>8.1f} {min(r['lone_s']):>7.2f} "
              + " ".join(f"{r[f'burst_{n}']['ratio']:>10.2f}" for n in (2, 3, 5, 8)))
    result["cache_mb"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"compile cache {result['cache_mb']:.0f} MiB; wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
