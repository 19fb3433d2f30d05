"""`make_worker`: the one way a worker is built, for `serve` (embedded) and `kolors-api worker` alike."""

from __future__ import annotations

import functools
from collections.abc import Callable

from kolors_api.jobs import JobStore
from kolors_api.settings import Settings
from kolors_api.worker.engines import DEFAULT_ENGINE, EngineFactory, load_factory
from kolors_api.worker.loop import Worker, WorkerConfig
from kolors_api.worker.model_check import check_model
from kolors_api.worker.safety import Safety, build_safety


def make_worker(settings: Settings, store: JobStore, *,
                on_job_done: Callable[[float, str, dict[str, float]], None] | None = None,
                worker_id: str | None = None) -> Worker:
    """The worker that `settings` describe, on `store`: the engine from `settings.engine` (loaded
    when the worker runs), leases and heartbeats, content safety. `on_job_done(seconds, outcome,
    stages)` is called after each job stored COMPLETED (engine seconds, `loop.timeline`), for metrics.

    Everything that can be refused is refused here, before any engine loads: a bad engine path
    (`EngineFactoryError`), a model the default engine cannot load (`ModelNotFound`: no such folder,
    a repo neither cached nor reachable), a bad blocked-terms file or screener, a missing `safety` extra.

    Example::

        worker = make_worker(Settings(model="tiny"), store)
        await worker.run()  # until worker.stop()
    """
    factory, safety = check_worker(settings)
    config = WorkerConfig(lease_seconds=settings.lease_seconds, heartbeat_seconds=settings.heartbeat_seconds,
                          max_batch_images=settings.max_batch_images,
                          max_batch_megapixels=settings.max_batch_megapixels,
                          batch_wait_ms=settings.batch_wait_ms)
    return Worker(store, functools.partial(factory, settings), config, worker_id=worker_id,
                  on_job_done=on_job_done, safety=safety)


def check_worker(settings: Settings) -> tuple[EngineFactory, Safety]:
    """What `make_worker` refuses, without building a worker: the engine factory and the content
    safety that `settings` name. `serve` and `kolors-api worker` call it before they start any engine
    process, so that a bad setting stops them in one line."""
    factory = load_factory(settings.engine)
    if settings.engine == DEFAULT_ENGINE:
        check_model(settings.model)
    return factory, build_safety(settings)
