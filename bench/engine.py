"""The seed request (1024², 25 steps, EulerDiscreteScheduler, webp q80) through our Engine against
stock diffusers `KolorsPipeline` called directly, in the same run, on the same weights.

    .venv/bin/python bench/engine.py --model tiny --repeats 3          # CPU, the offline tiny model
    .venv/bin/python bench/engine.py --model Kwai-Kolors/Kolors-diffusers --device cuda   # real weights
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, KolorsPipeline

from kolors_api.engine import Engine
from kolors_api.schema import GenerateParams

SEED = GenerateParams(prompt="In this lively 2D illustration, three animated boys are seen joyfully playing on a beach",
                      seed=441234134, steps=25, width=1024, height=1024, cfg=6.0)


def stock(pipe: KolorsPipeline, device: str) -> bytes:
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator(device=device).manual_seed(SEED.seed)
    with torch.inference_mode():
        img = pipe(prompt=SEED.prompt, guidance_scale=SEED.cfg, num_inference_steps=SEED.steps, width=SEED.width,
                   height=SEED.height, generator=[gen]).images[0]
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=80)
    return buf.getvalue()


def wall(fn) -> float:  # type: ignore[no-untyped-def]
    """Seconds one call of `fn` takes, the device synchronised before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    return [wall(fn) for _ in range(repeats)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/engine.json")
    args = ap.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="kolors-bench-"))
    t0 = time.perf_counter()
    engine = Engine(args.model, data_dir=data_dir, device=args.device)
    load_s = time.perf_counter() - t0
    dtype = engine.pipe.unet.dtype
    pipe = KolorsPipeline.from_pretrained(engine.path, torch_dtype=dtype).to(engine.device)
    pipe.set_progress_bar_config(disable=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = {
        "stock diffusers": timed(lambda: stock(pipe, engine.device), args.repeats),
        "kolors-api Engine": timed(lambda: engine.generate(SEED), args.repeats),
    }
    base = statistics.median(rows["stock diffusers"])
    print(f"seed request: {SEED.width}x{SEED.height}, {SEED.steps} steps, model={args.model}, device={engine.device}, "
          f"dtype={engine.dtype_name}, threads={torch.get_num_threads()}, engine load {load_s:.2f}s")
    print(f"{'path':20} {'median s':>9} {'min s':>7} {'x stock':>8}")
    result = []
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"{name:20} {med:>9.3f} {min(times):>7.3f} {med / base:>8.2f}")
        result.append({"path": name, "median_s": med, "min_s": min(times), "times": times, "ratio": med / base})
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if peak is not None:
        print(f"peak CUDA memory: {peak:.2f} GiB ({torch.cuda.get_device_name()})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": engine.device, "rows": result,
                                          "load_s": load_s, "peak_cuda_gib": peak, "cpu_count": os.cpu_count()},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
