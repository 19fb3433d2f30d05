"""Deliberately broken engines for the live tests: the real tiny Kolors engine, wrapped.

A server or worker loads one with ``--engine tests.engines:NAME`` (each is an engine factory,
see `kolors_api.worker.engines`); the child process imports ``tests`` from its working directory,
the repository root, like the test process. ``ENGINE_ENV`` makes sure of it wherever it runs.

- `slow`: sleeps env ``KOLORS_TEST_STEP_SECONDS`` (default 0.5) after every step;
- `gate`: a job whose prompt holds ``hold:NAME`` waits after step ``KOLORS_TEST_GATE_STEP`` (default
  1) until the test opens the gate (`wait_at_gate`; tests/pixel_engines.py's `Gate` is the test's side);
- `failing`: raises ``RuntimeError("injected fault")`` at step 1 when the prompt holds "fail";
- `kill_on_claim`: SIGKILLs its own process when asked for a prompt holding "poison";
- `kill_mid_step`: SIGKILLs its own process at step 2 when the prompt holds "crash";
- `kill_once`: the same, only the first time (it leaves the file env ``KOLORS_TEST_KILL_MARK`` behind);
- `slow_finish`: sleeps env ``KOLORS_TEST_FINISH_SECONDS`` (default 2) after the last step, before
  it hands the images back (a window for a cancel that comes "during the last step").
- `unloadable`: raises ``OSError("injected: weights not fully cached")`` while loading, as
  `from_pretrained` does when the weights are neither cached nor reachable.

Where the pixels are not the point, tests/pixel_engines.py has the same broken engines around a
torch-free one (its processes start in about a second).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kolors_api.schema import GenerateParams
from kolors_api.settings import Settings
from kolors_api.worker.engines import EngineLike, StepCallback, kolors

#: Env for a child process that loads these engines: the repository root on its path.
ENGINE_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH")]))}

StepHook = Callable[[GenerateParams, int], None]


class Wrapped:
    """The real engine, with `before(params)` run before each job and `after_step(params, step)`
    after each denoising step (before the worker's own step callback)."""

    def __init__(self, inner: EngineLike, *, before: Callable[[GenerateParams], None] | None = None,
                 after_step: StepHook | None = None) -> None:
        self.inner = inner
        self.before = before
        self.after_step = after_step

    def generate(self, params: GenerateParams, on_step: StepCallback | None = None) -> Any:
        if self.before is not None:
            self.before(params)

        def step(i: int, total: int, preview: Callable[[], bytes] | None = None) -> None:
            if self.after_step is not None:
                self.after_step(params, i)
            if on_step is not None:
                on_step(i, total, preview)

        return self.inner.generate(params, step)


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def wait_at_gate(params: GenerateParams, step: int) -> None:
    """After step ``KOLORS_TEST_GATE_STEP`` (default 1) of a job whose prompt holds ``hold:NAME``: write
    ``$KOLORS_TEST_GATE_DIR/NAME.held`` and wait for ``NAME.open`` (tests/pixel_engines.py's `Gate`)."""
    if step != int(os.environ.get("KOLORS_TEST_GATE_STEP", "1")):
        return
    for word in params.prompt.split():
        if word.startswith("hold:"):
            gate = Path(os.environ["KOLORS_TEST_GATE_DIR"])
            gate.mkdir(parents=True, exist_ok=True)
            name = word.removeprefix("hold:")
            (gate / f"{name}.held").touch()
            while not (gate / f"{name}.open").exists():
                time.sleep(0.01)


def gate(settings: Settings) -> Wrapped:
    return Wrapped(kolors(settings), after_step=wait_at_gate)


def slow(settings: Settings) -> Wrapped:
    seconds = float(os.environ.get("KOLORS_TEST_STEP_SECONDS", "0.5"))
    return Wrapped(kolors(settings), after_step=lambda params, i: time.sleep(seconds))


def fault(params: GenerateParams, i: int) -> None:
    if "fail" in params.prompt:
        raise RuntimeError("injected fault")


def poison(params: GenerateParams) -> None:
    if "poison" in params.prompt:
        _sigkill()


def crash(params: GenerateParams, i: int) -> None:
    if i == 2 and "crash" in params.prompt:
        _sigkill()


def failing(settings: Settings) -> Wrapped:
    return Wrapped(kolors(settings), after_step=fault)


def kill_on_claim(settings: Settings) -> Wrapped:
    return Wrapped(kolors(settings), before=poison)


def kill_mid_step(settings: Settings) -> Wrapped:
    return Wrapped(kolors(settings), after_step=crash)


def crash_once() -> StepHook:
    """`crash`, only the first time: it leaves the file env ``KOLORS_TEST_KILL_MARK`` behind."""
    mark = Path(os.environ["KOLORS_TEST_KILL_MARK"])

    def crash(params: GenerateParams, i: int) -> None:
        if i == 2 and "crash" in params.prompt and not mark.exists():
            mark.touch()
            _sigkill()

    return crash


def kill_once(settings: Settings) -> Wrapped:
    return Wrapped(kolors(settings), after_step=crash_once())


class SlowFinish(Wrapped):
    def generate(self, params: GenerateParams, on_step: StepCallback | None = None) -> Any:
        out = super().generate(params, on_step)
        time.sleep(float(os.environ.get("KOLORS_TEST_FINISH_SECONDS", "2")))
        return out


def slow_finish(settings: Settings) -> Wrapped:
    return SlowFinish(kolors(settings))


def unloadable(settings: Settings) -> Wrapped:
    raise OSError("injected: weights not fully cached")
