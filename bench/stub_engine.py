"""A stub engine for bench/serving_path.py: steps that wait with the GIL released, as a GPU step does.

Each step of a call sleeps `KOLORS_STUB_STEP_S` (default 0.05 s: the GIL is free, as while the
host waits on a CUDA queue), then runs `KOLORS_STUB_PY_MS` (default 3 ms) of Python holding the
GIL (the scheduler's and the pipeline's own bookkeeping), then calls every job's `on_step`. Its
`inference_time` is the call's own wall time, so what the worker adds shows apart from it.

    kolors-api serve --engine stub_engine:stub   # with bench/ on PYTHONPATH
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kolors_api.jobs.batching import BatchLimits
from kolors_api.schema import GenerateParams

STEP_S = float(os.environ.get("KOLORS_STUB_STEP_S", "0.05"))
PY_S = float(os.environ.get("KOLORS_STUB_PY_MS", "3")) / 1000
#: The smallest valid webp (1x1), for every image.
WEBP = bytes.fromhex("52494646240000005745425056503820180000003001009d012a0100010002003425a400037000feeb940000")


@dataclass
class Output:
    images: list[bytes]
    seeds: list[int]
    inference_time: float
    content_type: str = "image/webp"


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class StubEngine:
    def batch_limits(self) -> BatchLimits:
        return BatchLimits(max_images=16, max_pixels=0)

    def generate(self, params: GenerateParams, on_step: Any = None) -> Output:
        out = self.generate_batch([(params, on_step)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def generate_batch(self, jobs: Sequence[tuple[GenerateParams, Callable[..., None] | None]],
                       defer_encoding: bool = False) -> list[Output | BaseException]:
        started = time.perf_counter()
        steps = jobs[0][0].steps
        dropped: dict[int, BaseException] = {}
        for step in range(1, steps + 1):
            time.sleep(STEP_S)
            busy(PY_S)
            for n, (_, on_step) in enumerate(jobs):
                if on_step is not None and n not in dropped:
                    try:
                        on_step(step, steps, lambda: WEBP)
                    except Exception as exc:
                        dropped[n] = exc
        elapsed = time.perf_counter() - started
        return [dropped.get(n) or Output([WEBP] * params.number_of_images, params.seeds, elapsed)
                for n, (params, _) in enumerate(jobs)]


def stub(settings: Any) -> StubEngine:
    return StubEngine()
