"""Torch-free engines for the tests where the pixels are not the point: small real images, made by Pillow.

A server or worker loads one with ``--engine tests.pixel_engines:NAME`` (and ``ENGINE_ENV`` from
tests/engines.py, for the import path). None imports torch or diffusers, and none loads a model: a
process that runs one is up in about a second, so cancels, leases, progress, credits, webhooks,
rate limits, events and the fleet's behaviour are tested on processes that start fast. What the
pixels must be (the SDK tests, parity with diffusers, the playground, the README, one chaos test)
stays on the tiny Kolors pipeline (`tests.engines`, the default engine).

- `pixels`: every image is a flat colour drawn from (prompt, negative prompt, seed of the image,
  steps, cfg, scheduler), at the requested size, encoded in the requested format: same request,
  same bytes; another seed, other bytes. ``on_step`` is called after each of ``steps`` steps, with
  a preview: a webp of an eighth of the size, of another colour at each step.
- `gate`: `pixels`, but a job whose prompt holds ``hold:NAME`` stops after step
  ``KOLORS_TEST_GATE_STEP`` (default 1) until the test opens the gate: it writes
  ``$KOLORS_TEST_GATE_DIR/NAME.held`` when it gets there and goes on once
  ``$KOLORS_TEST_GATE_DIR/NAME.open`` exists (`Gate` below is the test's side).
- `slow`, `failing`, `kill_on_claim`, `kill_mid_step`, `kill_once`, `slow_finish`: the broken engines of
  tests/engines.py, around `pixels` instead of the tiny pipeline (`slow` sleeps before the first
  step too, where a pipeline encodes the prompt: ``KOLORS_TEST_FIRST_STEP_SECONDS``, by default a
  step's time).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from kolors_api.schema import GenerateParams
from kolors_api.settings import Settings
from kolors_api.worker.engines import StepCallback
from tests import engines
from tests.conftest import LiveServer, start_server
from tests.engines import Wrapped

ENGINE_ENV = engines.ENGINE_ENV
#: Pillow's names of our output formats.
FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


@dataclass
class Output:
    images: list[bytes]
    seeds: list[int]
    inference_time: float
    content_type: str = field(default="image/webp")


def colour(params: GenerateParams, seed: int, step: int | None = None) -> tuple[int, int, int]:
    """The colour of image `seed` of a request (at `step`, for a preview)."""
    key = repr((params.prompt, params.negative_prompt, seed, params.steps, params.cfg, params.scheduler, step))
    r, g, b = hashlib.sha256(key.encode()).digest()[:3]
    return r, g, b


def encode(size: tuple[int, int], rgb: tuple[int, int, int], output_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, FORMATS[output_format], quality=quality)
    return buf.getvalue()


class Pixels:
    """Flat-colour images at the requested size, one step callback per step; no torch."""

    def __init__(self, hold: Callable[[GenerateParams, int], None] | None = None) -> None:
        self.hold = hold

    def generate(self, params: GenerateParams, on_step: StepCallback | None = None) -> Output:
        started = time.perf_counter()
        size = (max(1, params.width // 8), max(1, params.height // 8))
        for step in range(1, params.steps + 1):
            if on_step is not None:
                # the preview: a small webp of another colour at each step, as a denoising picture changes
                on_step(step, params.steps, lambda step=step: encode(  # type: ignore[misc]
                    size, colour(params, params.seeds[0], step), "webp", 50))
            if self.hold is not None:
                self.hold(params, step)
        images = [encode((params.width, params.height), colour(params, seed), params.output_format,
                         params.output_quality) for seed in params.seeds]
        return Output(images, params.seeds, time.perf_counter() - started, params.content_type)


def pixels(settings: Settings) -> Pixels:
    return Pixels()


class Gate:
    """The test's side of the `gate` engine: `env` for the process, `wait_held(name)` until a job
    holding ``hold:NAME`` waits at the gate, `open(name)` to let it go on."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {**ENGINE_ENV, "KOLORS_TEST_GATE_DIR": str(self.dir)}

    def held(self, name: str) -> bool:
        return (self.dir / f"{name}.held").exists()

    def wait_held(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.held(name):
            if time.monotonic() > deadline:
                raise AssertionError(f"no job reached the gate {name!r} in {timeout}s")
            time.sleep(0.02)

    def open(self, name: str) -> None:
        (self.dir / f"{name}.open").touch()


def gate(settings: Settings) -> Pixels:
    return Pixels(hold=engines.wait_at_gate)


# -- tests/engines.py's broken engines, torch-free
def slow(settings: Settings) -> Wrapped:
    # time before the first step too, as a pipeline encodes the prompt first
    seconds = float(os.environ.get("KOLORS_TEST_STEP_SECONDS", "0.5"))
    first = float(os.environ.get("KOLORS_TEST_FIRST_STEP_SECONDS", str(seconds)))
    return Wrapped(Pixels(), before=lambda params: time.sleep(first),
                   after_step=lambda params, i: time.sleep(seconds))


def failing(settings: Settings) -> Wrapped:
    return Wrapped(Pixels(), after_step=engines.fault)


def kill_on_claim(settings: Settings) -> Wrapped:
    return Wrapped(Pixels(), before=engines.poison)


def kill_mid_step(settings: Settings) -> Wrapped:
    return Wrapped(Pixels(), after_step=engines.crash)


def kill_once(settings: Settings) -> Wrapped:
    return Wrapped(Pixels(), after_step=engines.crash_once())


def slow_finish(settings: Settings) -> Wrapped:
    return engines.SlowFinish(Pixels())


def serving(engine: str = "pixels", *, env: dict[str, str | None] | None = None,
            extra: list[str] | None = None) -> dict[str, Any]:
    """`start_server`'s `env` and `extra` for a server that runs `engine` of this module, with `env`
    and `extra` added: ``start_server("tiny", data_dir, **serving("slow", env={...}))``."""
    return {"env": {**ENGINE_ENV, **(env or {})},
            "extra": ["--engine", f"tests.pixel_engines:{engine}", *(extra or [])]}


def pixel_server(tmp_path_factory: Any) -> Iterator[LiveServer]:
    """A module's live server on the `gate` engine (`pixels`; a ``hold:NAME`` prompt waits at the gate
    `server_gate(srv)`); ``yield from`` it in a module-scoped `server` fixture where the pixels are not
    the point (it overrides conftest's, on the tiny pipeline)."""
    data_dir = tmp_path_factory.mktemp("server")
    srv = start_server("tiny", data_dir, **serving("gate", env={"KOLORS_API_SYNC_TIMEOUT_SECONDS": "120",
                                                                "KOLORS_TEST_GATE_DIR": str(data_dir / "gate")}))
    yield srv
    srv.stop()


def server_gate(srv: LiveServer) -> Gate:
    """The gate of a `pixel_server`."""
    return Gate(srv.data_dir / "gate")
