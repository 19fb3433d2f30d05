"""The worker loop, written once against the `JobStore` interface.

claim ▸ run the engine (in a thread, so heartbeats and the event loop keep going) ▸ store ▸ ack.
The same loop runs in every engine process (`kolors_api.worker.process`), which `serve` and
`kolors-api worker` start and watch, built by `make_worker`. This module does not import torch:
the engine comes from a factory, called on the engine's own thread (see `kolors_api.worker.engines`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from kolors_api.jobs import JobState, JobStore, Lease
from kolors_api.jobs.batching import BatchLimits, StepClock, WaitRule, gather
from kolors_api.jobs.outage import Outage, is_outage
from kolors_api.schema import GenerateParams
from kolors_api.worker.commit import commit
from kolors_api.worker.engines import EngineLike
from kolors_api.worker.progress import CANCELLED, CallReports, JobAborted, JobRun, count_call

log = logging.getLogger("kolors_api.worker")


class WorkerState(enum.StrEnum):
    """Where a worker is in its life; the moves allowed are `TRANSITIONS`, each one logged."""

    STARTING = "starting"  # loading the engine
    IDLE = "idle"  # claiming
    BUSY = "busy"  # running a job
    DRAINING = "draining"  # stop() was called: the job in hand (if any) finishes, nothing more is claimed
    STOPPED = "stopped"


TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.IDLE, WorkerState.DRAINING, WorkerState.STOPPED}),
    WorkerState.IDLE: frozenset({WorkerState.BUSY, WorkerState.DRAINING, WorkerState.STOPPED}),
    WorkerState.BUSY: frozenset({WorkerState.IDLE, WorkerState.DRAINING, WorkerState.STOPPED}),
    WorkerState.DRAINING: frozenset({WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset(),
}


class SafetyLike(Protocol):
    """Content screening (see `kolors_api.worker.safety`): each check returns a reason to block, or None."""

    def check_prompt(self, params: GenerateParams) -> str | None: ...
    def check_images(self, images: list[bytes]) -> str | None: ...


@dataclass
class WorkerConfig:
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    claim_timeout: float = 1.0
    #: Images per engine call (0: the engine's `batch_limits()`, sized for its device; 1: no batching).
    max_batch_images: int = 0
    #: Images × pixels per engine call, in millions (0: the engine's default).
    max_batch_megapixels: float = 0.0
    #: How long a claimed job waits for company before its call starts: -1 the auto rule
    #: (`kolors_api.jobs.batching`), 0 never (batch what is queued), N up to N ms.
    batch_wait_ms: int = -1

    @property
    def alive_ttl(self) -> float:
        """How long one liveness report counts: three missed heartbeats (at least 5 s)."""
        return max(self.heartbeat_seconds * 3, 5.0)


class Worker:
    """Runs jobs from `store` on the engine that `engine_factory` loads, until `stop()`;
    the job in hand is finished first."""

    def __init__(self, store: JobStore, engine_factory: Callable[[], EngineLike],
                 config: WorkerConfig | None = None, *, worker_id: str | None = None,
                 on_job_done: Callable[[float, str, dict[str, float]], None] | None = None,
                 safety: SafetyLike | None = None) -> None:
        self.store = store
        self._engine_factory = engine_factory
        self.engine: EngineLike | None = None
        self.config = config or WorkerConfig()
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.state = WorkerState.STARTING
        self.jobs_done = 0  # jobs taken to an end (stored or not), for the state log
        self._stopping = asyncio.Event()
        #: Set once the engine has loaded (the engine process then says it is ready).
        self.loaded = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kolors-engine")
        # Output screening off the engine thread: the next batch denoises meanwhile.
        self._post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kolors-screen")
        self._on_job_done = on_job_done
        self.safety = safety
        self.outage = Outage(log, meanwhile="retrying until it is back")
        self.wait_rule = WaitRule()
        self.clock = StepClock()  # the step times of this worker's engine calls, for the wait rule

    def _enter(self, state: WorkerState) -> None:
        old = self.state
        if state == old:
            return
        if state not in TRANSITIONS[old]:
            raise RuntimeError(f"worker {self.id}: no transition from {old} to {state}")
        self.state = state
        per_job = {old, state} == {WorkerState.IDLE, WorkerState.BUSY}
        log.log(logging.DEBUG if per_job else logging.INFO, "worker %s: %s -> %s (%d jobs done)",
                self.id, old, state, self.jobs_done)

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Stop claiming; the job in hand completes."""
        if self.state not in (WorkerState.DRAINING, WorkerState.STOPPED):
            self._enter(WorkerState.DRAINING)
        self._stopping.set()

    def batch_limits(self) -> BatchLimits:
        """How many jobs one engine call may take: the configured limits, else the engine's own
        (`batch_limits()`, sized for its device); 1 for an engine without `generate_batch`."""
        if not hasattr(self.engine, "generate_batch"):
            return BatchLimits()
        engine_limits = getattr(self.engine, "batch_limits", None)
        default = engine_limits() if callable(engine_limits) else BatchLimits()
        config = self.config
        return BatchLimits(max_images=config.max_batch_images or default.max_images,
                           max_pixels=round(config.max_batch_megapixels * 1e6) or default.max_pixels)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_alive = 0.0
        finishing: asyncio.Task[None] | None = None
        try:
            if self.engine is None:
                # Loading takes seconds to minutes: off the event loop, on the engine's own thread.
                self.engine = await loop.run_in_executor(self._pool, self._engine_factory)
            self.loaded.set()
            limits = self.batch_limits()
            if not self._stopping.is_set():
                self._enter(WorkerState.IDLE)
            while not self._stopping.is_set():
                try:
                    if time.monotonic() - last_alive > self.config.heartbeat_seconds:
                        await self.store.worker_alive(self.id, self.config.alive_ttl)
                        last_alive = time.monotonic()
                    lease = await self.store.claim(self.id, self.config.lease_seconds, self.config.claim_timeout)
                    self.outage.ok()
                except Exception as exc:
                    # The store is unreachable for a moment: keep the worker, try again shortly
                    # (an outage is logged once, when it starts; anything else every time).
                    self._store_error(exc, "while claiming")
                    await asyncio.sleep(1.0)
                    continue
                if lease is None:
                    continue
                if not self._stopping.is_set():
                    self._enter(WorkerState.BUSY)
                leases = [lease, *await gather(
                    self.store, self.id, self.config.lease_seconds, lease, limits, wait_ms=self.config.batch_wait_ms,
                    rule=self.wait_rule, clock=self.clock,
                    on_error=lambda exc: self._store_error(exc, "while batching"))]
                try:
                    finish = await self.process_batch(leases)
                except Exception as exc:  # their leases run out and another delivery retries them
                    self._store_error(exc, f"running jobs {', '.join(le.job.id for le in leases)}")
                    continue
                # Storing this batch overlaps the next one's denoising (one batch in flight).
                if finishing is not None:
                    await finishing
                finishing = asyncio.create_task(finish)
                if not self._stopping.is_set():
                    self._enter(WorkerState.IDLE)
        finally:
            if finishing is not None:
                with contextlib.suppress(Exception):
                    await finishing
            self._enter(WorkerState.STOPPED)
            with contextlib.suppress(Exception):
                await self.store.worker_alive(self.id, 0)
            self._pool.shutdown(wait=False)
            self._post.shutdown(wait=False)

    def _store_error(self, exc: BaseException, doing: str) -> None:
        if is_outage(exc):
            self.outage.failed(exc)
        else:
            log.error("worker %s: store error %s", self.id, doing, exc_info=exc)

    async def process(self, lease: Lease) -> None:
        """Run one claimed job to COMPLETED or FAILED (unless its lease is lost)."""
        await (await self.process_batch([lease]))

    async def process_batch(self, leases: list[Lease]) -> Coroutine[Any, Any, None]:
        """Run claimed jobs of one shape in one engine call; returns the coroutine that screens and
        stores their outcomes (the caller runs it while the engine takes the next batch)."""
        loop = asyncio.get_running_loop()
        reports = CallReports(self.store, loop)
        runs = [JobRun(self.store, lease, reports) for lease in leases]
        for run in runs:  # input pictures (image to image, IP-Adapter) come from the store
            try:
                missing = await run.load_inputs()
            except Exception as exc:  # the store is out: the lease runs out and the job comes again
                self._store_error(exc, f"reading the inputs of job {run.job.id}")
                run.done = True
                continue
            if missing:
                await self._store(run, self.store.fail(run.lease, missing))
                run.done = True
        runs = [run for run in runs if not run.done]
        safety = self.safety
        if safety is not None:
            for run in runs:
                blocked = await loop.run_in_executor(self._pool, safety.check_prompt, run.params)
                if blocked:
                    await self._store(run, self.store.fail(run.lease, f"content blocked: {blocked}"))
                    run.done = True
                    await run.log_outcome()
        runs = [run for run in runs if not run.done]
        if not runs:
            return _nothing()
        hb = asyncio.create_task(self._heartbeats(runs))
        count_call(runs)
        log.debug("worker %s: %d job(s) in one engine call: %s", self.id, len(runs), " ".join(r.job.id for r in runs))
        assert self.engine is not None
        engine = self.engine
        generate_batch = getattr(engine, "generate_batch", None)
        if generate_batch is not None:
            batch = [(run.params, run.on_step) for run in runs]
            deferred = {"defer_encoding": True} if getattr(engine, "defer_encoding", False) else {}
            started = time.monotonic()
            call_started = time.time()
            outs = await loop.run_in_executor(self._pool, lambda: generate_batch(batch, **deferred))
            first = runs[0].params
            self.clock.observe(first.width, first.height, first.steps_run, sum(r.params.number_of_images for r in runs),
                               time.monotonic() - started)
        else:
            run = runs[0]

            def one() -> list[Any]:
                try:
                    return [engine.generate(run.params, run.on_step)]
                except Exception as exc:
                    return [exc]
            call_started = time.time()
            outs = await loop.run_in_executor(self._pool, one)
        call_ended = time.time()
        for run in runs:
            run.call = (call_started, call_ended)
        return self._finish(runs, outs, hb)

    async def _heartbeats(self, runs: list[JobRun]) -> None:
        """Renew every lease of a batch until its outcome is stored."""
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                for run in runs:
                    await run.heartbeat(self.config.lease_seconds)
                await self.store.worker_alive(self.id, self.config.alive_ttl)
            except Exception as exc:
                # Keep working: if the store is back before the lease runs out, the job is kept.
                if not is_outage(exc):
                    raise
                self.outage.failed(exc)

    async def _finish(self, runs: list[JobRun], outs: list[Any], hb: asyncio.Task[None]) -> None:
        try:
            for run, out in zip(runs, outs, strict=True):
                await run.settle()
                await self._store(run, self._outcome(run, out))
                run.done = True
                await run.log_outcome()
        finally:
            hb.cancel()

    async def _store(self, run: JobRun, outcome: Awaitable[Any]) -> None:
        """Await a job's outcome; when the store fails, the lease runs out and another delivery retries it."""
        try:
            await outcome
        except Exception as exc:
            self._store_error(exc, f"storing job {run.job.id}")
            log.warning("worker %s: job %s could not be stored; it is delivered again when its lease runs out",
                        self.id, run.job.id)
        self.jobs_done += 1

    async def _outcome(self, run: JobRun, out: Any) -> None:
        """Store what the engine made of one job: COMPLETED, FAILED, or nothing (lease lost)."""
        job, lease = run.job, run.lease
        if isinstance(out, JobAborted):
            if str(out) == CANCELLED:
                await self.store.fail(lease, CANCELLED)
            log.warning("job %s aborted: %s", job.id, out)
            return
        if isinstance(out, BaseException):
            log.error("job %s failed", job.id, exc_info=out)
            await self.store.fail(lease, engine_error(out, job.id))
            return
        loop = asyncio.get_running_loop()
        if getattr(out, "encode", None) is not None:  # encoded here, while the engine runs the next batch
            await run.enter("encoding")
            out.images = await loop.run_in_executor(self._post, out.encode)
        async with run.phase("storing"):  # the images' screening, then the store
            if self.safety is not None:
                blocked = await loop.run_in_executor(self._post, self.safety.check_images, out.images)
                if blocked:
                    await self.store.fail(lease, f"content blocked: {blocked}")
                    return
            metrics = timeline(job.created_at, job.started_at, run.call, time.time())
            metrics["inference_time"] = round(out.inference_time, 4)
            peak = getattr(out, "peak_memory_bytes", None)  # optional in the engine contract (CUDA only)
            if peak is not None:
                metrics["peak_memory_mb"] = round(peak / 2**20, 1)
            # through a blob- or job-store outage: the images are kept and storing is tried again
            done = await commit(self.store, lease, out.images, run.params.output_format, out.seeds, metrics)
        if done is None:
            return  # the stores stayed out past the bound: FAILED, saying so (logged there)
        if done:
            # a cancel that came during the last step wins over the completion (FAILED "cancelled")
            stored = run.stored = await self.store.finished(lease)
            state = stored.state if stored is not None else JobState.COMPLETED
            if state == JobState.FAILED:
                log.warning("job %s: cancelled during its last step; images dropped, refunded", job.id)
            if self._on_job_done is not None:
                self._on_job_done(out.inference_time, state.value, metrics)
        else:
            log.warning("job %s: lease lost before completion; result dropped", job.id)


def timeline(created: float, claimed: float | None, call: tuple[float, float] | None,
             stored: float) -> dict[str, float]:
    """A job's stages on the worker's side, in seconds (wall clock, as the store's timestamps):
    `queue_time` submit to claim, `batch_wait` claim to the engine call (waiting for company, the
    prompt screening), `call_time` the engine call (the batch's), `finish_time` the call's end to the
    store (encoding, image screening, progress settling), `total_time` submit to the store."""
    claimed = claimed or stored
    start, end = call or (claimed, claimed)
    stages = {"queue_time": claimed - created, "batch_wait": start - claimed, "call_time": end - start,
              "finish_time": stored - end, "total_time": stored - created}
    return {name: round(max(0.0, value), 4) for name, value in stages.items()}


async def _nothing() -> None:
    return None


def engine_error(exc: BaseException, job_id: str) -> str:
    """What a client reads when the engine fails: what to do about it; the exception text goes to
    the log only (it names internals and may quote the prompt)."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text:
        return ("engine error: out of memory for this request; try fewer images, fewer steps or a "
                "smaller width and height")
    return f"engine error: the model could not generate this request (logged on the server as job {job_id})"
