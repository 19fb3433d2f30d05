"""Engine factories: how a worker gets the engine it runs jobs on (`--engine package.module:factory`).

The contract. A factory is a callable named by its import path, ``package.module:name`` (setting
`Settings.engine`, env ``KOLORS_API_ENGINE``, flag ``--engine`` of ``serve`` and ``worker``). Each
worker calls it once, on its engine thread, as ``factory(settings)`` with the process's `Settings`,
and reports alive only once it returns (so warm up there). It returns an engine (`EngineLike`)::

    engine.generate(params: GenerateParams, on_step: StepCallback | None) -> output

``output`` has ``images`` (encoded bytes in ``params.output_format``), ``seeds`` (``params.seeds``)
and ``inference_time`` (seconds), like `kolors_api.engine.GenerationOutput`. Call ``on_step(step,
total, preview)`` after each denoising step: it reports progress, and raises to stop the run
(cancellation, a lost lease), so let its exception through. ``preview`` is optional: a
zero-argument callable that returns a small webp of the job's first image at this step (1/8 of its
size will do; `kolors_api.engine.previews` makes one from latents); the worker calls it only on
the steps it previews, during ``on_step``. An engine that calls ``on_step(step, total)`` works
too, without previews. Any other exception ends the job FAILED with
``"engine error: <type>: <message>"``. One worker runs one `generate` at a time, on one thread.

Example: your own pipeline around ours (``my_engines.py``, importable by the worker)::

    from kolors_api.worker.engines import kolors

    class Watermarked:
        def __init__(self, inner):
            self.inner = inner

        def generate(self, params, on_step=None):
            out = self.inner.generate(params, on_step)
            out.images = [stamp(image) for image in out.images]
            return out

    def watermarked(settings):
        return Watermarked(kolors(settings))

and ``kolors-api worker --store redis://redis:6379/0 --engine my_engines:watermarked``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kolors_api.schema import GenerateParams

if TYPE_CHECKING:
    from kolors_api.settings import Settings


class GenerationLike(Protocol):
    """What `generate` returns (`kolors_api.engine.GenerationOutput` is one)."""

    images: list[bytes]
    seeds: list[int]
    inference_time: float


class StepCallback(Protocol):
    """The worker's step callback: ``on_step(step, total)`` or ``on_step(step, total, preview)``."""

    def __call__(self, step: int, total: int, preview: Callable[[], bytes] | None = None, /) -> None: ...


class EngineLike(Protocol):
    def generate(self, params: GenerateParams, on_step: StepCallback | None = None) -> GenerationLike: ...


EngineFactory = Callable[["Settings"], EngineLike]
#: `Settings.engine` by default: the Kolors pipeline that `Settings.model` names.
DEFAULT_ENGINE = "kolors_api.worker.engines:kolors"


class EngineFactoryError(ValueError):
    """`Settings.engine` names no importable factory (raised at start-up, before any engine loads)."""


def load_factory(path: str) -> EngineFactory:
    """The factory that `path` (``package.module:name``) names; imports its module, calls nothing."""
    module_name, sep, name = path.partition(":")
    if not (sep and module_name and name):
        raise EngineFactoryError(f"engine: {path!r} is not of the form package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineFactoryError(f"engine: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise EngineFactoryError(f"engine: {module_name!r} has no callable {name!r}")
    return factory  # type: ignore[no-any-return]


def kolors(settings: Settings) -> EngineLike:
    """The default factory: the Kolors pipeline that `settings.model` names, on `settings.device`, run
    as the settings `dtype`, `compile`, `vae` and `offload` say, warmed up (`Engine.warm_up`)."""
    from kolors_api.engine import Engine, EngineOptions  # torch lives behind this import
    from kolors_api.settings import compile_shapes

    options = EngineOptions(dtype=settings.dtype, compile=settings.compile, vae=settings.vae,
                            offload=settings.offload, compile_shapes=compile_shapes(settings.compile_shapes),
                            prompt_cache_mb=settings.prompt_cache_mb, compile_batches=settings.compile_batches,
                            compile_cache=str(settings.compile_cache or settings.data_dir / "compile-cache"),
                            batch_images=settings.max_batch_images, ip_adapter=settings.ip_adapter)
    engine = Engine(settings.model, data_dir=settings.data_dir, device=settings.device, options=options)
    engine.warm_up()
    return engine
