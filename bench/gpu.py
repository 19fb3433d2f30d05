"""The seed request (1024², 25 steps, cfg 6, EulerDiscreteScheduler, webp q80) on full-size random
weights (`random:full`: Kolors' real shapes), in one run, on one set of weights:

1. stock diffusers: `KolorsPipeline(...)(prompt, ...)` in fp16, as its docs show it;
2. our `Engine`, default options (fp16, SDPA, channels_last, fp32 VAE decode), and its images/s at
   batch 1, 2, 4, 8 (number_of_images), 4 and 8 one-image jobs in one call (`generate_batch`, the
   worker's batching), one 2048² image (decoded in tiles), and the VAE decode alone in fp32 and bf16;
3. our `Engine` with `--compile` (torch.compile of the UNet; compile time reported apart).

Peak accelerator memory per row. Prints a table and writes JSON. `bench/gpu.sh` runs it on a GPU
machine without diffusers or network; on CPU try it with `--size small`:

    .venv/bin/python bench/gpu.py --size small --device cpu --repeats 1 --batches 1,2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# The seed request and stock diffusers' call of it: the same as bench/engine.py's (this folder is on
# sys.path when a script in it runs).
from engine import SEED, stock  # noqa: E402

from kolors_api.engine import Engine, EngineOptions  # noqa: E402
from kolors_api.engine.previews import preview_webp  # noqa: E402
from kolors_api.engine.random_weights import build_random_pipeline, parameter_counts  # noqa: E402


class Bench:
    def __init__(self, device: str, repeats: int, out: Path) -> None:
        self.out = out
        self.meta: dict[str, Any] = {}
        self.device = device
        self.cuda = torch.device(device).type == "cuda"
        self.repeats = repeats
        self.rows: list[dict[str, Any]] = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, name: str, fn: Callable[[], object], images: int = 1, warm_up: bool = True,
            repeats: int | None = None) -> dict[str, Any]:
        """Time `fn` `repeats` times after one warm-up call; peak memory over the timed calls."""
        warm_s = None
        if warm_up:
            self.sync()
            started = time.perf_counter()
            fn()
            self.sync()
            warm_s = time.perf_counter() - started
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats or self.repeats):
            self.sync()
            started = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        row = {"path": name, "images": images, "median_s": median, "min_s": min(times), "times": times,
               "images_per_s": images / median, "warm_up_s": warm_s,
               "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None}
        self.rows.append(row)
        peak = "" if row["peak_gib"] is None else f", peak {row['peak_gib']:.1f} GiB"
        print(f"  {name}: {median:.3f}s median of {len(times)}{peak}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        """Write the JSON after every row: a run cut short keeps what it measured."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("small", "full"), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8", help="number_of_images of one request")
    ap.add_argument("--job-batches", default="4,8", help="one-image jobs run together (the worker's batching)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--more", action="store_true", help="rows for deferred encoding, a live preview and one step")
    ap.add_argument("--offload", action="store_true", help="a last row with --offload (its own CPU-built weights)")
    ap.add_argument("--no-large", dest="large", action="store_false", help="skip the 2048x2048 row (tiled decode)")
    ap.add_argument("--no-vae-rows", dest="vae_rows", action="store_false", help="skip timing the VAE decode alone")
    ap.add_argument("--out", default="bench/results/gpu.json")
    args = ap.parse_args()
    from diffusers import KolorsPipeline

    bench = Bench(args.device, args.repeats, Path(args.out))
    dtype = torch.float16 if bench.cuda else torch.float32
    started = time.perf_counter()
    pipe = build_random_pipeline(args.size, device=args.device, dtype=dtype)
    bench.sync()
    build_s = time.perf_counter() - started
    counts = parameter_counts(pipe)
    name = torch.cuda.get_device_name(args.device) if bench.cuda else platform.processor() or "cpu"
    print(f"random:{args.size} ({sum(counts.values()) / 1e6:,.1f} M parameters, {dtype}) built on {args.device} "
          f"in {build_s:.1f}s; device: {name}; torch {torch.__version__}", flush=True)
    bench.meta = {"size": args.size, "device": args.device, "device_name": name, "dtype": str(dtype),
                  "torch": torch.__version__, "build_s": build_s, "parameters": counts, "cpu_count": os.cpu_count()}

    stock_pipe = KolorsPipeline(**pipe.components, force_zeros_for_empty_prompt=False)
    stock_pipe.set_progress_bar_config(disable=True)
    bench.run("stock diffusers", lambda: stock(stock_pipe, args.device))

    engine = Engine(f"random:{args.size}", device=args.device, pipeline=pipe)
    for i, batch in enumerate(int(b) for b in args.batches.split(",") if b):
        params = dataclasses.replace(SEED, number_of_images=batch)
        bench.run("kolors-api Engine" + (f", batch {batch}" if batch > 1 else ""),
                  lambda params=params: engine.generate(params), images=batch, warm_up=i == 0)

    for batch in (int(b) for b in args.job_batches.split(",") if b):
        # what the worker's batching runs: `batch` one-image jobs, each its own prompt and seed
        jobs = [(dataclasses.replace(SEED, prompt=f"{SEED.prompt}, variant {k}", seed=SEED.seed + 1000 * k), None)
                for k in range(batch)]
        bench.run(f"Engine, {batch} jobs batched", lambda jobs=jobs: engine.generate_batch(jobs), images=batch,
                  warm_up=False)

    if args.more:
        # encoding off the engine thread (the worker's default on CUDA): what the call itself takes
        jobs8 = [(dataclasses.replace(SEED, prompt=f"{SEED.prompt}, variant {k}", seed=SEED.seed + 1000 * k), None)
                 for k in range(8)]
        bench.run("8 jobs, encoding deferred", lambda: engine.generate_batch(jobs8, defer_encoding=True), images=8,
                  warm_up=False, repeats=1)
        # one live preview (engine.previews: latents -> RGB at 1/8 size, webp) against a step
        latents = torch.randn(1, 4, SEED.height // 8, SEED.width // 8, device=args.device)
        bench.run("preview, 1/8 size webp", lambda: preview_webp(latents[0]), repeats=20)
        one_step = dataclasses.replace(SEED, steps=1)
        bench.run("one step (1-step request)", lambda: engine.generate(one_step), repeats=3)

    if args.vae_rows:  # where the decode's time goes: the fp32 VAE against a bf16 copy (same range as fp32)
        latents = torch.randn(1, 4, SEED.height // 8, SEED.width // 8, device=args.device,
                              generator=torch.Generator(args.device).manual_seed(0))
        for vae_dtype in (torch.float32, torch.bfloat16):
            vae = engine.pipe.vae if vae_dtype == torch.float32 else copy.deepcopy(engine.pipe.vae).to(vae_dtype)

            def decode(vae: Any = vae, dtype: torch.dtype = vae_dtype) -> None:
                with torch.inference_mode():
                    vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)

            bench.run(f"VAE decode, {str(vae_dtype).removeprefix('torch.')}", decode)

    if args.large:
        large = dataclasses.replace(SEED, width=2048, height=2048)
        bench.run("Engine, 2048x2048", lambda: engine.generate(large), warm_up=False, repeats=1)

    if args.compile:
        options = EngineOptions(compile=True, compile_shapes=((SEED.width, SEED.height),))
        compiled = Engine(f"random:{args.size}", device=args.device, pipeline=pipe, options=options)
        started = time.perf_counter()
        compiled.warm_up()
        bench.sync()
        compile_s = time.perf_counter() - started
        print(f"  compiled in {compile_s:.1f}s", flush=True)
        row = bench.run("Engine --compile", lambda: compiled.generate(SEED), warm_up=False)
        row["compile_s"] = compile_s

    if args.offload:
        # --offload (cards of about 16 GB): its own weights, built on the CPU, each model on the GPU
        # only while it runs; the point is the peak memory
        engine = compiled = pipe = stock_pipe = None  # free the device's copy first
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
        started = time.perf_counter()
        offloaded = Engine(f"random:{args.size}", device=args.device, options=EngineOptions(offload=True))
        print(f"  offloaded engine built in {time.perf_counter() - started:.1f}s", flush=True)
        bench.run("Engine --offload", lambda: offloaded.generate(SEED), repeats=1)

    base = bench.rows[0]["median_s"]
    print(f"\nseed request {SEED.width}x{SEED.height}, {SEED.steps} steps, cfg {SEED.cfg}: random:{args.size} "
          f"on {name}, {dtype}, repeats {args.repeats}")
    print(f"{'path':28} {'images':>6} {'median s':>9} {'min s':>7} {'img/s':>7} {'x stock':>8} {'peak GiB':>9}")
    for row in bench.rows:
        speedup = base / (row["median_s"] / row["images"])
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        print(f"{row['path']:28} {row['images']:>6} {row['median_s']:>9.3f} {row['min_s']:>7.3f} "
              f"{row['images_per_s']:>7.3f} {speedup:>8.2f} {peak:>9}")
    bench.save()
    print(f"wrote {bench.out}")


if __name__ == "__main__":
    main()
