"""Images in: img2img throughput, and what taking a picture costs on the submit path (CPU, tiny model).

Throughput rows, 8 concurrent same-shape `kolors-img2img` requests (each a picture of its own, one
strength), seconds until all are answered, best of `--rounds`:
- stock diffusers, one request after another (`KolorsImg2ImgPipeline` called directly, here);
- our server (`kolors-api serve`, embedded) with batching off (`--max-batch-images 1`) and on;
- the peer that batches: LitServe around the stock pipeline (bench/litserve_img2img_peer.py,
  `max_batch_size` 8, `batch_timeout` 50 ms).

Intake rows (in this process, `kolors_api.api.intake.Intake`, median of `--intake-rounds`): a 1.5 MB
PNG as base64, as a data URI, and fetched from a URL on loopback; and the submit round trip
(`POST /v2/...`, an API-only server: no worker) of a text request against the same with the picture.

    .venv/bin/python bench/img2img.py                        # tiny model, 512², 20 steps at strength 0.5
    .venv/bin/python bench/img2img.py --concurrency 8 --rounds 3 --out bench/results/img2img.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import concurrent, wait_up  # noqa: E402  (bench/ is not a package)
from serving import KEY, free_port  # noqa: E402


def picture(width: int, height: int, seed: int, noise: float = 0.1) -> bytes:
    """A PNG: a gradient with `noise` of its pixels random (more noise, a larger file)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)
    mask = rng.random((height, width)) < noise
    rgb[mask] = rng.integers(0, 256, (int(mask.sum()), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def body(i: int, size: int, steps: int, strength: float, pictures: list[str]) -> dict[str, Any]:
    return {"prompt": f"a watercolour, take {i}", "seed": 1000 + i, "width": size, "height": size, "steps": steps,
            "strength": strength, "image": pictures[i % len(pictures)]}


def stock_sequential(pipe: Any, size: int, steps: int, strength: float, pictures: list[str], n: int) -> float:
    import torch

    started = time.perf_counter()
    for i in range(n):
        b = body(i, size, steps, strength, pictures)
        image = Image.open(io.BytesIO(base64.b64decode(b["image"]))).convert("RGB").resize((size, size))
        out = pipe(prompt=b["prompt"], image=image, strength=strength, guidance_scale=5.0, num_inference_steps=steps,
                   width=size, height=size, generator=[torch.Generator().manual_seed(b["seed"])]).images[0]
        out.save(io.BytesIO(), format="WEBP", quality=80)
    return time.perf_counter() - started


def serve(model: str, data_dir: Path, *extra: str, ready: str = "/readyz") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": KEY, "KOLORS_API_LOG_LEVEL": "warning",
           "KOLORS_API_FETCH_ALLOW_HOSTS": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "kolors_api.cli", "serve", "--port", str(port), "--model", model,
                             "--data-dir", str(data_dir), *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc, ready)
    return proc, url


def litserve(model: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("litserve_img2img_peer.py")), "--model",
                             model, "--port", str(port)], cwd=data_dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc, "/health")
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


class Files:
    """A picture server on loopback (GET /p.png)."""

    def __init__(self, data: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/p.png"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def median_ms(run: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def intake_costs(model: str, work: Path, rounds: int) -> dict[str, Any]:
    from kolors_api.api.intake import Intake
    from kolors_api.api.ssrf import Policy

    big = picture(800, 800, 7, noise=0.5)
    files = Files(big)
    intake = Intake(Policy("127.0.0.1"))
    text = base64.b64encode(big).decode()
    out: dict[str, Any] = {"png_bytes": len(big), "png_size": "800x800"}
    try:
        out["base64_ms"] = median_ms(lambda: asyncio.run(intake.take("image", text)), rounds)
        out["data_uri_ms"] = median_ms(lambda: asyncio.run(intake.take("image", f"data:image/png;base64,{text}")),
                                       rounds)

        async def by_url() -> None:
            fresh = Intake(Policy("127.0.0.1"))
            await fresh.take("image", files.url)
            await fresh.close()

        out["url_fetch_ms"] = median_ms(lambda: asyncio.run(by_url()), rounds)
        proc, url = serve(model, work / "submit", "--no-worker", ready="/healthz")
        try:
            headers = {"x-api-key": KEY}
            plain = {"prompt": "a fox", "steps": 20, "width": 512, "height": 512}
            with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
                def submit(path: str, payload: dict[str, Any]) -> None:
                    r = client.post(path, json=payload)
                    assert r.status_code == 200, r.text

                submit("/v2/kolors", plain)  # warm-up
                out["submit_text_ms"] = median_ms(lambda: submit("/v2/kolors", plain), rounds)
                out["submit_base64_ms"] = median_ms(
                    lambda: submit("/v2/kolors-img2img", {**plain, "image": text}), rounds)
                out["submit_url_ms"] = median_ms(
                    lambda: submit("/v2/kolors-img2img", {**plain, "image": files.url}), rounds)
        finally:
            stop(proc)
    finally:
        files.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a diffusers folder (default: the tiny model, built here)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--intake-rounds", type=int, default=15)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--out", default="bench/results/img2img.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kolors-img2img-bench-"))
    model = args.model
    if model is None:
        from kolors_api.engine import build_tiny_model

        model = str(build_tiny_model(work / "tiny"))
    size, steps, strength, n = args.size, args.steps, args.strength, args.concurrency
    pictures = [base64.b64encode(picture(640, 480, seed)).decode() for seed in range(n)]
    seconds: dict[str, float] = {}

    def best(name: str, run: Callable[[], float]) -> None:
        walls = [run() for _ in range(args.rounds)]
        seconds[name] = min(walls)
        print(f"  {name:38} {n} requests: {min(walls):7.2f}s best of {[round(w, 2) for w in walls]}", flush=True)

    if not args.skip_throughput:
        from diffusers import KolorsImg2ImgPipeline

        pipe = KolorsImg2ImgPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        stock_sequential(pipe, size, steps, strength, pictures, 1)  # warm-up
        best("stock img2img, one after another", lambda: stock_sequential(pipe, size, steps, strength, pictures, n))
        del pipe

        async def v1(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post("/v1/kolors-img2img", json=body(i, size, steps, strength, pictures))

        async def predict(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post("/predict", json=body(i, size, steps, strength, pictures))

        peers: list[tuple[str, Callable[[], tuple[subprocess.Popen[bytes], str]], Any]] = [
            ("kolors-api, batching off", lambda: serve(model, work / "off", "--max-batch-images", "1"), v1),
            ("kolors-api, batching on", lambda: serve(model, work / "on"), v1),
            ("LitServe peer, max_batch_size 8", lambda: litserve(model, work), predict),
        ]
        for name, start, send in peers:
            proc, url = start()
            try:
                asyncio.run(concurrent(1, send, url))  # warm-up
                best(name, lambda send=send, url=url: asyncio.run(concurrent(n, send, url)))
            finally:
                stop(proc)
    intake = intake_costs(model, work, args.intake_rounds)
    print(f"\n{size}x{size}, {steps} steps at strength {strength} ({int(steps * strength)} run), {n} concurrent, "
          f"{os.cpu_count()} cores, best of {args.rounds}: seconds until all are answered")
    if seconds:
        base = seconds["stock img2img, one after another"]
        print(f"{'path':38} {'seconds':>8} {'x stock':>8}")
        for name, wall in seconds.items():
            print(f"{name:38} {wall:>8.2f} {base / wall:>8.2f}")
    print(f"\nintake of a {intake['png_bytes'] / 2**20:.2f} MB PNG ({intake['png_size']}), median of "
          f"{args.intake_rounds}, ms")
    for name in ("base64_ms", "data_uri_ms", "url_fetch_ms", "submit_text_ms", "submit_base64_ms", "submit_url_ms"):
        print(f"  {name:22} {intake[name]:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": size, "steps": steps, "strength": strength, "concurrency": n,
                               "rounds": args.rounds, "cpu_count": os.cpu_count(), "seconds": seconds,
                               "intake": intake}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
