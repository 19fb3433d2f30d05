"""Whether batching pays on this device: wall seconds per image of stock diffusers `KolorsPipeline` and
our `Engine.generate_batch` at 1, 2, 4 and 8 images a call (distinct prompts and seeds), in one run,
alternating, the median of `--repeats`. Prints a table and writes JSON.

    .venv/bin/python bench/engine_batches.py                       # CPU, the offline tiny model, 512², 20 steps
    .venv/bin/python bench/engine_batches.py --model Kwai-Kolors/Kolors-diffusers --device cuda --size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, KolorsPipeline

# one call's wall time as bench/engine.py takes it (this folder is on the path of a script run from it)
from engine import wall

from kolors_api.engine import Engine
from kolors_api.schema import GenerateParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", default="1,2,4,8", help="images per call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/engine_batches.json")
    args = ap.parse_args()
    engine = Engine(args.model, data_dir=Path(tempfile.mkdtemp(prefix="kolors-bench-")), device=args.device)
    pipe = KolorsPipeline.from_pretrained(engine.path, torch_dtype=engine.pipe.unet.dtype).to(engine.device)
    pipe.set_progress_bar_config(disable=True)
    size, steps = args.size, args.steps

    def stock(n: int) -> Any:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        with torch.inference_mode():
            return pipe(prompt=[f"a cat {i}" for i in range(n)], num_inference_steps=steps, width=size, height=size,
                        generator=[torch.Generator(engine.device).manual_seed(i) for i in range(n)]).images

    def ours(n: int) -> Any:
        return engine.generate_batch([(GenerateParams(prompt=f"a cat {i}", steps=steps, width=size, height=size,
                                                      seed=i), None) for i in range(n)])

    rows: dict[tuple[str, int], Callable[[], Any]] = {
        (name, n): (lambda f=f, n=n: f(n)) for name, f in (("stock diffusers", stock), ("kolors-api Engine", ours))
        for n in (int(s) for s in args.sizes.split(","))}
    for call in rows.values():  # warm-up
        call()
    walls: dict[tuple[str, int], list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for k, call in rows.items():  # the sizes take turns: the machine's drift touches them alike
            walls[k].append(wall(call))
    print(f"{size}x{size}, {steps} steps, model {args.model}, {engine.device}, threads {torch.get_num_threads()}: "
          "median wall seconds")
    print(f"{'path':18} {'images':>6} {'per call':>9} {'per image':>10}")
    result = []
    for (name, n), times in walls.items():
        median = statistics.median(times)
        print(f"{name:18} {n:>6} {median:>9.3f} {median / n:>10.3f}")
        result.append({"path": name, "images": n, "median_s": median, "per_image_s": median / n, "times": times})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": engine.device, "size": size, "steps": steps,
                                          "cpu_count": os.cpu_count(), "rows": result}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
