"""What a live preview costs on the engine thread, against a denoising step, on the same run.

For each size, one job runs with a step callback that only records the time (the step time is the
median interval between callbacks), and one calls the engine's `preview()` at every step and
times each call (latents -> RGB by the fixed linear map -> webp at 1/8 of the image size). The
worker takes a preview only every `preview_every(steps)` steps, so the cost per step it adds is
the preview's cost divided by that.

    .venv/bin/python bench/previews.py                       # CPU, the offline tiny model
    .venv/bin/python bench/previews.py --model Kwai-Kolors/Kolors-diffusers --device cuda --sizes 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kolors_api.engine import Engine
from kolors_api.schema import GenerateParams
from kolors_api.worker.previews import preview_every


def step_times(engine: Engine, params: GenerateParams, with_preview: bool) -> tuple[list[float], list[float], int]:
    """(intervals between step callbacks, preview() times, preview bytes) of one run."""
    marks: list[float] = []
    costs: list[float] = []
    size = 0

    def on_step(step: int, total: int, preview: Callable[[], bytes] | None = None) -> None:
        nonlocal size
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if with_preview and preview is not None:
            t0 = time.perf_counter()
            size = len(preview())
            costs.append(time.perf_counter() - t0)
            marks[-1] += costs[-1]  # the next interval starts after the preview: steps only

    engine.generate(params, on_step)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)], costs, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    ap.add_argument("--out", default="bench/results/previews.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(args.model, data_dir=Path(tmp), device=args.device)
        engine.warm_up()
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            params = GenerateParams(prompt="a lighthouse at dusk", seed=7, steps=args.steps, width=size, height=size)
            step_times(engine, params, False)  # warm-up of this shape
            steps, _, _ = step_times(engine, params, False)
            _, previews, nbytes = step_times(engine, params, True)
            step, preview = statistics.median(steps), statistics.median(previews)
            every = preview_every(args.steps)
            rows.append({"size": size, "preview_px": size // 8, "step_ms": step * 1e3, "preview_ms": preview * 1e3,
                         "preview_bytes": nbytes, "preview_vs_step_pct": 100 * preview / step,
                         "every": every, "added_per_step_pct": 100 * preview / step / every})
    print(f"{args.model} on {engine.device}, {args.steps} steps, {args.threads} thread(s)")
    print(f"{'size':>6} {'preview':>8} {'step ms':>9} {'preview ms':>11} {'bytes':>6} {'% of step':>10} "
          f"{'every':>6} {'added/step':>11}")
    for r in rows:
        print(f"{r['size']:>6} {r['preview_px']:>6}px {r['step_ms']:>9.2f} {r['preview_ms']:>11.3f} "
              f"{r['preview_bytes']:>6} {r['preview_vs_step_pct']:>9.2f}% {r['every']:>6} "
              f"{r['added_per_step_pct']:>10.2f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "device": engine.device, "steps": args.steps,
                               "threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
