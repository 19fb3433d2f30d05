"""One claimed job inside a worker's pipeline call: its lease, its progress, its way out.

A worker runs a batch of jobs (one, or several of one shape: `kolors_api.jobs.batching`) in one
engine call. Each job keeps its own lease, progress reports, cancellation and outcome: `JobRun`
holds them. Its `on_step` is what the engine calls after each denoising step, on the engine's
thread; it raises `JobAborted` once the job must stop (cancelled, or its lease lost), and the
engine then drops that job alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable

from kolors_api.jobs import JobStore, Lease
from kolors_api.schema import GenerateParams
from kolors_api.worker.previews import take_preview


class JobAborted(Exception):  # noqa: N818
    """Raised from the step callback to stop the engine: lease lost or job cancelled."""


CANCELLED = "cancelled"
LEASE_LOST = "lease lost"

#: Engine calls of the process's workers, and the jobs and images they ran (jobs / calls: the mean
#: batch): `kolors_engine_calls_total`, `kolors_engine_call_jobs_total`, `kolors_engine_call_images_total`.
CALLS = {"calls": 0, "jobs": 0, "images": 0}


def count_call(runs: list[JobRun]) -> None:
    CALLS["calls"] += 1
    CALLS["jobs"] += len(runs)
    CALLS["images"] += sum(run.params.number_of_images for run in runs)


class JobRun:
    """A claimed job while the engine runs it."""

    def __init__(self, store: JobStore, lease: Lease, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.lease = lease
        self.job = lease.job
        self.params = GenerateParams.from_dict(lease.job.params)
        self.loop = loop
        self.abort = threading.Event()
        self.reason = ""
        self.done = False  # its outcome is stored (or dropped): no more heartbeats
        # Reports are taken in the order of the steps (a lock is FIFO; tasks start in the order
        # `on_step` scheduled them): a watcher never sees step n after step n+1.
        self._in_order = asyncio.Lock()
        self._reports: list[concurrent.futures.Future[None]] = []

    def stop(self, reason: str) -> None:
        if not self.abort.is_set():
            self.reason = reason
            self.abort.set()

    async def report(self, step: int, total: int, preview: bytes | None = None) -> None:
        """Store the progress (and a preview); a lost lease or a cancel request stops the job. A
        cancelled job ends FAILED "cancelled" (refunded) at once, while the rest of its batch goes on."""
        async with self._in_order:
            if self.abort.is_set():
                return
            if not await self.store.progress(self.lease, step, total, preview):
                self.stop(LEASE_LOST)
                return
            current = await self.store.get(self.job.id)
            if current is not None and current.cancel_requested:
                self.stop(CANCELLED)
                await self.store.fail(self.lease, CANCELLED)

    def on_step(self, step: int, total: int, preview: Callable[[], bytes] | None = None) -> None:
        """The engine's step callback (engine thread): report (with a preview now and then, made
        here: it is only valid during this call), or raise `JobAborted` to stop."""
        if self.abort.is_set():
            raise JobAborted(self.reason or "aborted")
        self._reports.append(asyncio.run_coroutine_threadsafe(
            self.report(step, total, take_preview(step, total, preview)), self.loop))

    async def settle(self) -> None:
        """Wait for the reports the engine scheduled (before the job's outcome is stored, so the last
        progress and preview land first); their failures were handled where they happened."""
        reports, self._reports = self._reports, []
        await asyncio.gather(*(asyncio.wrap_future(r) for r in reports), return_exceptions=True)

    async def heartbeat(self, lease_seconds: float) -> None:
        """Renew the lease once; a lost one stops the job."""
        if not self.done and not await self.store.heartbeat(self.lease, lease_seconds):
            self.stop(LEASE_LOST)
