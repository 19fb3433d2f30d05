"""The worker loop, written once against the `JobStore` interface.

claim ▸ run the engine (in a thread, so heartbeats and the event loop keep going) ▸ store ▸ ack.
The same loop runs inside `serve` (embedded) and as `kolors-api worker` (fleet). This module does
not import torch: the engine is handed in (or built by `load_engine`, which imports it lazily).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from kolors_api.jobs import JobStore, Lease
from kolors_api.schema import GenerateParams

log = logging.getLogger("kolors_api.worker")


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPED = "stopped"


class EngineLike(Protocol):
    def generate(self, params: GenerateParams, on_step: Callable[[int, int], None] | None = None) -> Any: ...


class SafetyLike(Protocol):
    """Content screening (see `kolors_api.safety`): each check returns a reason to block, or None."""

    def check_prompt(self, params: GenerateParams) -> str | None: ...
    def check_images(self, images: list[bytes]) -> str | None: ...


class JobAborted(Exception):  # noqa: N818
    """Raised from the step callback to stop the engine: lease lost or job cancelled."""


@dataclass
class WorkerConfig:
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    claim_timeout: float = 1.0
    #: Test-only fault injection (env KOLORS_API_TEST_FAULTS); see `Worker._fault`.
    faults: str = field(default_factory=lambda: os.environ.get("KOLORS_API_TEST_FAULTS", ""))

    @property
    def alive_ttl(self) -> float:
        """How long one liveness report counts: three missed heartbeats (at least 5 s)."""
        return max(self.heartbeat_seconds * 3, 5.0)


def load_engine(model: str, data_dir: Any, device: str | None) -> EngineLike:
    """Load the engine and run one small warm-up image, so the first job does not pay for
    kernel selection and allocator growth (the worker reports alive only after this)."""
    from kolors_api.engine import Engine  # torch lives behind this import

    engine = Engine(model, data_dir=data_dir, device=device)
    engine.generate(GenerateParams(prompt="warm-up", steps=1, width=512, height=512))
    return engine


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
        self.jobs_done = 0
        self._stopping = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kolors-engine")
        self._on_job_done = on_job_done
        self.safety = safety

    def stop(self) -> None:
        """Stop claiming; the job in hand completes."""
        if self.state != WorkerState.STOPPED:
            self.state = WorkerState.DRAINING
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.engine is None:
            # Loading takes seconds to minutes: off the event loop, on the engine's own thread.
            self.engine = await loop.run_in_executor(self._pool, self._engine_factory)
        self.state = WorkerState.IDLE
        last_alive = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if time.monotonic() - last_alive > self.config.heartbeat_seconds:
                        await self.store.worker_alive(self.id, self.config.alive_ttl)
                        last_alive = time.monotonic()
                    lease = await self.store.claim(self.id, self.config.lease_seconds, self.config.claim_timeout)
                except Exception:
                    # The store is unreachable for a moment: keep the worker, try again shortly.
                    log.exception("worker %s: store error while claiming", self.id)
                    await asyncio.sleep(1.0)
                    continue
                if lease is None:
                    continue
                self.state = WorkerState.BUSY
                try:
                    await self.process(lease)
                except Exception:
                    # The outcome could not be stored: the lease runs out and another delivery retries it.
                    log.exception("worker %s: job %s could not be stored", self.id, lease.job.id)
                self.jobs_done += 1
                if not self._stopping.is_set():
                    self.state = WorkerState.IDLE
        finally:
            self.state = WorkerState.STOPPED
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
        self._fault("claim", params)

        async def report(step: int, total: int) -> None:
            if not await self.store.progress(lease, step, total):
                reason.append("lease lost")
                abort.set()
            else:
                current = await self.store.get(job.id)
                if current is not None and current.cancel_requested:
                    reason.append("cancelled")
                    abort.set()

        def on_step(step: int, total: int) -> None:
            self._fault("step", params)
            if abort.is_set():
                raise JobAborted(reason[0] if reason else "aborted")
            asyncio.run_coroutine_threadsafe(report(step, total), loop)

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(self.config.heartbeat_seconds)
                if not await self.store.heartbeat(lease, self.config.lease_seconds):
                    reason.append("lease lost")
                    abort.set()
                    return
                await self.store.worker_alive(self.id, self.config.alive_ttl)

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
            await self.store.fail(lease, f"engine error: {type(exc).__name__}: {exc}")
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
        ext = params.output_format
        if await self.store.complete(lease, out.images, ext, out.seeds, metrics):
            if self._on_job_done is not None:
                self._on_job_done(out.inference_time, "COMPLETED")
        else:
            log.warning("job %s: lease lost before completion; result dropped", job.id)

    def _fault(self, where: str, params: GenerateParams) -> None:
        """Test-only seam, reached only through env KOLORS_API_TEST_FAULTS (comma-separated):
        `kill-on-claim:<word>` / `kill-on-step:<word>` SIGKILL this process when a job whose prompt
        contains <word> is claimed / steps; `fail-on-step:<word>` raises inside the engine (an
        engine error); `slow-step:<seconds>` sleeps in every step."""
        for fault in filter(None, self.config.faults.split(",")):
            kind, _, arg = fault.partition(":")
            if kind == f"kill-on-{where}" and arg in params.prompt:
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "fail-on-step" and where == "step" and arg in params.prompt:
                raise RuntimeError("injected fault")
            if kind == "slow-step" and where == "step":
                time.sleep(float(arg))
