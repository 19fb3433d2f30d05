"""The worker loop, written once against the `JobStore` interface.

claim ▸ run the engine (in a thread, so heartbeats and the event loop keep going) ▸ store ▸ ack.
The same loop runs inside `serve` (embedded) and as `kolors-api worker` (fleet), both built by
`make_worker`. This module does not import torch: the engine comes from a factory, called on the
engine's own thread (see `kolors_api.worker.engines`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from kolors_api.jobs import JobState, JobStore, Lease
from kolors_api.jobs.outage import Outage, is_outage
from kolors_api.schema import GenerateParams
from kolors_api.worker.engines import EngineLike
from kolors_api.worker.previews import take_preview

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


class JobAborted(Exception):  # noqa: N818
    """Raised from the step callback to stop the engine: lease lost or job cancelled."""


@dataclass
class WorkerConfig:
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    claim_timeout: float = 1.0

    @property
    def alive_ttl(self) -> float:
        """How long one liveness report counts: three missed heartbeats (at least 5 s)."""
        return max(self.heartbeat_seconds * 3, 5.0)


class Worker:
    """Runs jobs from `store` on the engine that `engine_factory` loads, until `stop()`;
    the job in hand is finished first."""

    def __init__(self, store: JobStore, engine_factory: Callable[[], EngineLike],
                 config: WorkerConfig | None = None, *, worker_id: str | None = None,
                 on_job_done: Callable[[float, str], None] | None = None,
                 safety: SafetyLike | None = None) -> None:
        self.store = store
        self._engine_factory = engine_factory
        self.engine: EngineLike | None = None
        self.config = config or WorkerConfig()
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.state = WorkerState.STARTING
        self.jobs_done = 0  # jobs taken to an end (stored or not), for the state log
        self._stopping = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kolors-engine")
        self._on_job_done = on_job_done
        self.safety = safety
        self.outage = Outage(log, meanwhile="retrying until it is back")

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

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_alive = 0.0
        try:
            if self.engine is None:
                # Loading takes seconds to minutes: off the event loop, on the engine's own thread.
                self.engine = await loop.run_in_executor(self._pool, self._engine_factory)
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
                    if is_outage(exc):
                        self.outage.failed(exc)
                    else:
                        log.exception("worker %s: store error while claiming", self.id)
                    await asyncio.sleep(1.0)
                    continue
                if lease is None:
                    continue
                if not self._stopping.is_set():
                    self._enter(WorkerState.BUSY)
                try:
                    await self.process(lease)
                except Exception as exc:
                    # The outcome could not be stored: the lease runs out and another delivery retries it.
                    if is_outage(exc):
                        self.outage.failed(exc)
                        log.warning("worker %s: job %s could not be stored (store unavailable); it is "
                                    "delivered again when its lease runs out", self.id, lease.job.id)
                    else:
                        log.exception("worker %s: job %s could not be stored", self.id, lease.job.id)
                self.jobs_done += 1
                if not self._stopping.is_set():
                    self._enter(WorkerState.IDLE)
        finally:
            self._enter(WorkerState.STOPPED)
            with contextlib.suppress(Exception):
                await self.store.worker_alive(self.id, 0)
            self._pool.shutdown(wait=False)

    async def process(self, lease: Lease) -> None:
        """Run one claimed job to COMPLETED or FAILED (unless its lease is lost)."""
        loop = asyncio.get_running_loop()
        job = lease.job
        params = GenerateParams.from_dict(job.params)
        abort = threading.Event()
        reason: list[str] = []

        async def report(step: int, total: int, preview: bytes | None = None) -> None:
            if not await self.store.progress(lease, step, total, preview):
                reason.append("lease lost")
                abort.set()
            else:
                current = await self.store.get(job.id)
                if current is not None and current.cancel_requested:
                    reason.append("cancelled")
                    abort.set()

        def on_step(step: int, total: int, preview: Callable[[], bytes] | None = None) -> None:
            if abort.is_set():
                raise JobAborted(reason[0] if reason else "aborted")
            asyncio.run_coroutine_threadsafe(report(step, total, take_preview(step, total, preview)), loop)

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(self.config.heartbeat_seconds)
                try:
                    if not await self.store.heartbeat(lease, self.config.lease_seconds):
                        reason.append("lease lost")
                        abort.set()
                        return
                    await self.store.worker_alive(self.id, self.config.alive_ttl)
                except Exception as exc:
                    # Keep working: if the store is back before the lease runs out, the job is kept.
                    if not is_outage(exc):
                        raise
                    self.outage.failed(exc)

        safety = self.safety
        if safety is not None:
            blocked = await loop.run_in_executor(self._pool, safety.check_prompt, params)
            if blocked:
                await self.store.fail(lease, f"content blocked: {blocked}")
                return
        hb = asyncio.create_task(heartbeat())
        started = time.time()
        try:
            assert self.engine is not None
            engine = self.engine
            out = await loop.run_in_executor(self._pool, lambda: engine.generate(params, on_step))
            if safety is not None:
                blocked = await loop.run_in_executor(self._pool, safety.check_images, out.images)
                if blocked:
                    await self.store.fail(lease, f"content blocked: {blocked}")
                    return
        except JobAborted as exc:
            if str(exc) == "cancelled":
                await self.store.fail(lease, "cancelled")
            log.warning("job %s aborted: %s", job.id, exc)
            return
        except Exception as exc:
            log.exception("job %s failed", job.id)
            await self.store.fail(lease, engine_error(exc, job.id))
            return
        finally:
            hb.cancel()
        now = time.time()
        created = job.created_at
        metrics = {
            "inference_time": round(out.inference_time, 4),
            "queue_time": round(max(0.0, (job.started_at or started) - created), 4),
            "total_time": round(now - created, 4),
        }
        peak = getattr(out, "peak_memory_bytes", None)  # optional in the engine contract (CUDA only)
        if peak is not None:
            metrics["peak_memory_mb"] = round(peak / 2**20, 1)
        ext = params.output_format
        if await self.store.complete(lease, out.images, ext, out.seeds, metrics):
            # a cancel that came during the last step wins over the completion (FAILED "cancelled")
            stored = await self.store.get(job.id)
            state = stored.state if stored is not None else JobState.COMPLETED
            if state == JobState.FAILED:
                log.warning("job %s: cancelled during its last step; images dropped, refunded", job.id)
            if self._on_job_done is not None:
                self._on_job_done(out.inference_time, state.value)
        else:
            log.warning("job %s: lease lost before completion; result dropped", job.id)


def engine_error(exc: BaseException, job_id: str) -> str:
    """What a client reads when the engine fails: what to do about it; the exception text goes to
    the log only (it names internals and may quote the prompt)."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text:
        return ("engine error: out of memory for this request; try fewer images, fewer steps or a "
                "smaller width and height")
    return f"engine error: the model could not generate this request (logged on the server as job {job_id})"
