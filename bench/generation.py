"""Generation throughput: 1, 4 and 8 concurrent same-shape requests, in one run, on one set of weights.

Rows, each the best of `--rounds`:
- stock diffusers, one request after another (`KolorsPipeline` called directly, in this process);
- our server (`kolors-api serve`, embedded: SQLite and the in-process worker) with batching off
  (`--max-batch-images 1`) and on (the default, sized for the device), sync v1 requests;
- the peer that batches: a LitServe server around the same pipeline (bench/litserve_peer.py, its
  `max_batch_size` 8, `batch_timeout` 50 ms).

    .venv/bin/python bench/generation.py                      # tiny model, 512², 20 steps
    .venv/bin/python bench/generation.py --model PATH --size 1024 --steps 25 --concurrency 1,4,8
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import KEY, free_port  # noqa: E402  (bench/ is not a package)


def body(i: int, size: int, steps: int) -> dict[str, Any]:
    return {"prompt": f"a lighthouse at dusk, take {i}", "seed": 1000 + i, "width": size, "height": size,
            "steps": steps}


def stock_pipeline(model: str) -> Any:
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_sequential(pipe: Any, size: int, steps: int, n: int) -> float:
    """Wall seconds for `n` requests one after another through stock diffusers (webp q80 each)."""
    import torch

    started = time.perf_counter()
    for i in range(n):
        b = body(i, size, steps)
        image = pipe(prompt=b["prompt"], guidance_scale=5.0, num_inference_steps=steps, width=size, height=size,
                     generator=[torch.Generator().manual_seed(b["seed"])]).images[0]
        image.save(io.BytesIO(), format="WEBP", quality=80)
    return time.perf_counter() - started


def wait_up(url: str, proc: subprocess.Popen[bytes], path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode})")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}: not up after {timeout}s")


async def concurrent(n: int, send: Callable[[httpx.AsyncClient, int], Any], url: str) -> float:
    """Wall seconds until all of `n` concurrent requests are answered (each must answer 200)."""
    async with httpx.AsyncClient(base_url=url, headers={"x-api-key": KEY}, timeout=600) as client:
        started = time.perf_counter()
        answers = await asyncio.gather(*(send(client, i) for i in range(n)))
        wall = time.perf_counter() - started
    bad = [r.status_code for r in answers if r.status_code != 200]
    if bad:
        raise RuntimeError(f"{url}: answers {bad}")
    return wall


def serve(model: str, batch: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": KEY, "KOLORS_API_LOG_LEVEL": "warning"}
    args = ["serve", "--port", str(port), "--model", model, "--data-dir", str(data_dir)]
    if batch != "default":
        args += ["--max-batch-images", batch]
    proc = subprocess.Popen([sys.executable, "-m", "kolors_api.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc, "/readyz")
    return proc, url


def litserve(model: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    # its own session: LitServe's inference and API workers are processes of their own, stopped with it
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("litserve_peer.py")), "--model", model,
                             "--port", str(port)], cwd=data_dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc, "/health")
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a diffusers folder (default: the tiny model, built here)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/generation.json")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kolors-gen-bench-"))
    model = args.model
    if model is None:
        from kolors_api.engine import build_tiny_model

        model = str(build_tiny_model(work / "tiny"))
    size, steps = args.size, args.steps
    results: dict[str, dict[int, float]] = {}

    def best(name: str, n: int, run: Callable[[], float]) -> None:
        walls = [run() for _ in range(args.rounds)]
        results.setdefault(name, {})[n] = min(walls)
        print(f"  {name:34} {n} requests: {min(walls):7.2f}s best of {[round(w, 2) for w in walls]}", flush=True)

    pipe = stock_pipeline(model)
    stock_sequential(pipe, size, steps, 1)  # warm-up
    for n in levels:
        best("stock diffusers, one after another", n, lambda n=n, pipe=pipe: stock_sequential(pipe, size, steps, n))
    del pipe

    async def v1(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/kolors", json=body(i, size, steps))

    async def predict(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/predict", json=body(i, size, steps))

    servers: list[tuple[str, Callable[[], tuple[subprocess.Popen[bytes], str]], Any]] = [
        ("kolors-api, batching off", lambda: serve(model, "1", work / "off"), v1),
        ("kolors-api, batching on", lambda: serve(model, "default", work / "on"), v1),
        ("LitServe peer, max_batch_size 8", lambda: litserve(model, work), predict),
    ]
    for name, start, send in servers:
        proc, url = start()
        try:
            asyncio.run(concurrent(1, send, url))  # warm-up
            for n in levels:
                best(name, n, lambda n=n, send=send, url=url: asyncio.run(concurrent(n, send, url)))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the process and its children (LitServe's workers)
            proc.wait(30)
    base = results["stock diffusers, one after another"]
    print(f"\n{size}x{size}, {steps} steps, {os.cpu_count()} cores, best of {args.rounds}: seconds until all "
          "concurrent requests are answered (x stock: throughput against stock diffusers one after another)")
    print(f"{'path':34}" + "".join(f" {f'{n} req s':>9} {'x stock':>8}" for n in levels))
    for name, walls in results.items():
        print(f"{name:34}" + "".join(f" {walls[n]:>9.2f} {base[n] / walls[n]:>8.2f}" for n in levels))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": size, "steps": steps, "rounds": args.rounds, "cpu_count": os.cpu_count(),
                               "seconds": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
