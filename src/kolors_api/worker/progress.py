"""Progress reporting: one claimed job inside a worker's pipeline call (its lease, its progress, its
way out) and the reports of one call.

A worker runs a batch of jobs (one, or several of one shape: `kolors_api.jobs.batching`) in one
engine call. Each job keeps its own lease, progress reports, cancellation and outcome: `JobRun`
holds them. Its `on_step` is what the engine calls after each denoising step, on the engine's
thread; it raises `JobAborted` once the job must stop (cancelled, or its lease lost), and the
engine then drops that job alone.

The progress of a call's jobs goes to the store through one `CallReports`: at most one round trip
in flight per call (`JobStore.progress_many`), carrying every job's latest step, whose answers
bring back each job's cancel flag and whether anyone watches its previews (previews are made only
then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from kolors_api.jobs import Job, JobState, JobStore, Lease, ProgressAck, ProgressReport
from kolors_api.jobs.outage import is_outage
from kolors_api.schema import GenerateParams
from kolors_api.worker.previews import take_preview


class JobAborted(Exception):  # noqa: N818
    """Raised from the step callback to stop the engine: lease lost or job cancelled."""


log = logging.getLogger("kolors_api.worker")

CANCELLED = "cancelled"
LEASE_LOST = "lease lost"
#: A phase after the engine's that nobody follows (`JobRun.phase`) is stored once it lasted this long, in
#: seconds (one sooner over is not: a poller misses at most this much of it).
QUIET_PHASE_SECONDS = 0.05

#: Engine calls of the process's workers, and the jobs and images they ran (jobs / calls: the mean
#: batch): `kolors_engine_calls_total`, `kolors_engine_call_jobs_total`, `kolors_engine_call_images_total`.
CALLS = {"calls": 0, "jobs": 0, "images": 0}


def count_call(runs: list[JobRun]) -> None:
    CALLS["calls"] += 1
    CALLS["jobs"] += len(runs)
    CALLS["images"] += sum(run.params.number_of_images for run in runs)


class CallReports:
    """The progress reports of one engine call's jobs, sent to the store in step order, one round
    trip at a time: a round goes once every live job of the call has reported the step (or after
    `STRAGGLER_SECONDS`), and what piles up meanwhile goes in the next (a job's latest step only)."""

    #: A round waits no longer than this for a job that does not report (an engine that skips it).
    STRAGGLER_SECONDS = 0.05

    def __init__(self, store: JobStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self._lock = threading.Lock()  # `put` runs on the engine thread, the sending on the loop
        self._runs: list[JobRun] = []
        self._latest: dict[JobRun, int] = {}
        self._pending: dict[JobRun, ProgressReport] = {}
        self._sending: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, run: JobRun) -> None:
        self._runs.append(run)

    def put(self, run: JobRun, step: int, total: int, preview: bytes | None, phase: str = "denoising") -> None:
        """Queue a job's step (engine thread); a preview not yet sent stays with the newer step."""
        with self._lock:
            older = self._pending.get(run)
            if preview is None and older is not None:
                preview = older.preview
            self._pending[run] = ProgressReport(run.lease, step, total, preview, phase)
            self._latest[run] = step
            ready = self._round_complete()
        self.loop.call_soon_threadsafe(self._kick if ready else self._arm)

    def _round_complete(self) -> bool:
        """(Under the lock.) Every live job has reported the newest step pending."""
        if not self._pending:
            return False
        newest = max(report.step for report in self._pending.values())
        # (a job already done, e.g. blocked by the prompt screening, or stopped reports no more)
        return all(self._latest.get(run, 0) >= newest for run in self._runs if not (run.done or run.abort.is_set()))

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.STRAGGLER_SECONDS, self._kick, True)

    def _kick(self, force: bool = False) -> None:
        if self._sending is None or self._sending.done():
            self._sending = self.loop.create_task(self._send(force))

    async def _send(self, force: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while True:
            with self._lock:
                if not (force or self._round_complete()):
                    if self._pending:
                        self._arm()
                    return
                batch, self._pending = self._pending, {}
            force = False
            if not batch:
                return
            try:
                acks = await self.store.progress_many(list(batch.values()))
            except Exception as exc:  # the lease may still hold when the store is back: keep going
                if not is_outage(exc):
                    log.error("progress of %s not stored", " ".join(r.job.id for r in batch), exc_info=exc)
                continue
            for run, ack in zip(batch, acks, strict=True):
                try:
                    await run.acknowledged(ack)
                except Exception as exc:  # storing a cancel failed: the job is stopped, its outcome tries again
                    if not is_outage(exc):
                        log.error("job %s: cancel not stored", run.job.id, exc_info=exc)

    async def settle(self) -> None:
        """Send every report put so far and wait for the answers (before the outcomes are stored:
        the last progress and preview land first)."""
        while True:
            sending = self._sending
            if sending is not None and not sending.done():
                with contextlib.suppress(Exception):  # its failures were logged where they happened
                    await asyncio.shield(sending)
                continue
            with self._lock:
                if not self._pending:
                    return
            self._kick(force=True)


def outcome_line(lease: Lease, job: Job | None, key_name: str | None) -> str:
    """`job 3f2a… key alice: 1024x1024 x1, 25 steps, queued 0.12 s, ran 3.40 s: COMPLETED`."""
    params = lease.job.params
    now = time.time()
    started = lease.job.started_at or now
    ended = job.finished_at if job is not None and job.finished_at else now
    if job is None:
        outcome = "gone (expired)"
    elif job.state == JobState.COMPLETED:
        outcome = "COMPLETED"
    elif job.state == JobState.FAILED:
        outcome = f"FAILED: {job.error}"
    else:
        outcome = f"lease lost (delivery {lease.delivery}); delivered again"
    return (f"job {lease.job.id} key {key_name or '-'}: {params.get('width')}x{params.get('height')} "
            f"x{params.get('number_of_images', 1)}, {params.get('steps')} steps, "
            f"queued {max(0.0, started - lease.job.created_at):.2f} s, ran {max(0.0, ended - started):.2f} s: "
            f"{outcome}")


class JobRun:
    """A claimed job while the engine runs it."""

    #: Key names for the outcome lines, by key id (read once per process; a rename shows after a restart).
    key_names: dict[str, str | None] = {}

    def __init__(self, store: JobStore, lease: Lease, reports: CallReports) -> None:
        self.store = store
        self.lease = lease
        self.job = lease.job
        self.params = GenerateParams.from_dict(lease.job.params)
        self.reports = reports
        reports.add(self)
        self.total_steps = 0  # as the engine's last step said
        self.abort = threading.Event()
        self.reason = ""
        self.done = False  # its outcome is stored (or dropped): no more heartbeats
        self.previews_watched = False  # as the store's last answer said
        self.followed = True  # someone follows its changes, as the store's last answer said (`phase`)
        self.call: tuple[float, float] | None = None  # the engine call's start and end (wall clock)
        self.stored: Job | None = None  # the job as read after its outcome was stored, when it was

    async def load_inputs(self) -> str | None:
        """Read the job's input pictures from the store into its params (`GenerateParams.inputs`);
        what is missing, or None."""
        names = [name for name in (self.params.image, self.params.ip_adapter_image) if name is not None]
        inputs: dict[str, bytes] = {}
        for name in names:
            data = await self.store.read_input(self.job.id, name)
            if data is None:
                return f"input picture {name[:12]}… is missing from the store"
            inputs[name] = data
        if inputs:
            self.params = replace(self.params, inputs=inputs)
        return None

    def stop(self, reason: str) -> None:
        if not self.abort.is_set():
            self.reason = reason
            self.abort.set()

    async def acknowledged(self, ack: ProgressAck) -> None:
        """The store's answer to a progress report: a lost lease or a cancel request stops the job.
        A cancelled job ends FAILED "cancelled" (refunded) at once, while the rest of its batch goes on."""
        if self.abort.is_set():
            return
        self.previews_watched = ack.previews_watched
        self.followed = ack.followed
        if not ack.held:
            self.stop(LEASE_LOST)
        elif ack.cancel_requested:
            self.stop(CANCELLED)
            await self.store.fail(self.lease, CANCELLED)

    def on_step(self, step: int, total: int, preview: Callable[[], bytes] | None = None) -> None:
        """The engine's step callback (engine thread): report (with a preview now and then, while
        someone watches, made here: it is only valid during this call), or raise `JobAborted`."""
        if self.abort.is_set():
            raise JobAborted(self.reason or "aborted")
        self.total_steps = total
        # after the last step the engine decodes the latents: that is what the job does next
        self.reports.put(self, step, total, take_preview(step, total, preview if self.previews_watched else None),
                         "decoding" if step >= total else "denoising")

    async def enter(self, phase: str, *, late: bool = False) -> None:
        """Say the phase that starts now, after the engine's (`encoding`, `storing`); a report the store
        refuses (lease lost) stops the job, one that fails is only logged (the outcome goes on). `late`:
        said after the phase started (`phase`), when the job's outcome may be stored already: a refusal
        says nothing then."""
        total = self.total_steps or self.params.steps
        try:
            acks = await self.store.progress_many([ProgressReport(self.lease, total, total, None, phase)])
        except Exception as exc:
            if not is_outage(exc):
                log.error("job %s: phase %s not stored", self.job.id, phase, exc_info=exc)
            return
        self.followed = acks[0].followed
        if not acks[0].held and not late:
            self.stop(LEASE_LOST)

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        """The block is the phase `name` (`storing`: the screening and the store of the outcome): said at
        once while someone follows the job's changes (the store's last answer said so: an event stream,
        a sync request, a webhook for progress), else only once it lasted `QUIET_PHASE_SECONDS`. A phase
        over sooner that nobody follows is never stored (its end, the outcome, says more): one round trip
        less per job, while every follower still gets it."""
        if self.followed:
            await self.enter(name)
            yield
            return
        sending = asyncio.Event()

        async def late() -> None:
            await asyncio.sleep(QUIET_PHASE_SECONDS)
            sending.set()
            await self.enter(name, late=True)

        task = asyncio.create_task(late())
        try:
            yield
        finally:
            if not sending.is_set():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # (its failures were logged)
                await task

    async def settle(self) -> None:
        """Wait for the reports the engine made so far (see `CallReports.settle`)."""
        await self.reports.settle()

    async def log_outcome(self) -> None:
        """The one INFO line of a job this worker took to an end: its id, key name, shape, steps,
        queue and run time, and outcome (as stored; "lease lost" when another delivery has it now)."""
        if not log.isEnabledFor(logging.INFO):
            return
        key_id = self.job.key_id
        try:
            job = self.stored or await self.store.get(self.job.id)
            if key_id and key_id not in self.key_names:
                if len(self.key_names) > 10_000:
                    self.key_names.clear()
                key = await self.store.get_key(key_id)
                self.key_names[key_id] = key.name if key is not None else None
        except Exception as exc:  # the store is away: the outcome was logged where it failed
            log.debug("job %s: outcome not read for the log", self.job.id, exc_info=exc)
            return
        log.info(outcome_line(self.lease, job, self.key_names.get(key_id) if key_id else None))

    async def heartbeat(self, lease_seconds: float) -> None:
        """Renew the lease once; a lost one stops the job."""
        if not self.done and not await self.store.heartbeat(self.lease, lease_seconds):
            self.stop(LEASE_LOST)
