"""A call's progress on both stores: one store round trip per step for all of its jobs, each job's
steps stored in order, and a cancel that lands within one step (`kolors_api.worker.progress.CallReports`)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from kolors_api.jobs import JobState, JobStore, ProgressAck, ProgressReport
from kolors_api.jobs.batching import BatchLimits
from kolors_api.schema import GenerateParams
from tests.test_batching import job_params, running, submit_all, terminal, wait_for
from tests.test_store import drop, make


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    s = await make(request.param, tmp_path)
    yield s
    await drop(s)


class Out:
    def __init__(self, params: GenerateParams) -> None:
        self.images = [b"RIFF0000WEBP"] * params.number_of_images
        self.seeds = params.seeds
        self.inference_time = 0.0


class StepEngine:
    """GPU-like steps: each waits `step_seconds` (the GIL free), then every job's `on_step`. Records
    the step it is at and the step at which each job's callback raised."""

    def __init__(self, step_seconds: float = 0.03) -> None:
        self.step_seconds = step_seconds
        self.step = 0
        self.raised_at: dict[str, int] = {}
        self.calls: list[int] = []

    def batch_limits(self) -> BatchLimits:
        return BatchLimits(max_images=8)

    def generate(self, params: GenerateParams, on_step: Any = None) -> Out:
        raise AssertionError("a batching engine is called through generate_batch")

    def generate_batch(self, jobs: Sequence[tuple[GenerateParams, Callable[..., None] | None]],
                       defer_encoding: bool = False) -> list[Any]:
        self.calls.append(len(jobs))
        dropped: dict[int, BaseException] = {}
        total = jobs[0][0].steps
        for step in range(1, total + 1):
            time.sleep(self.step_seconds)
            self.step = step
            for n, (params, on_step) in enumerate(jobs):
                if on_step is None or n in dropped:
                    continue
                try:
                    on_step(step, total, lambda: b"preview")
                except Exception as exc:
                    dropped[n] = exc
                    self.raised_at[params.prompt] = step
        return [dropped.get(n) or Out(params) for n, (params, _) in enumerate(jobs)]


def record_progress(store: JobStore) -> list[list[tuple[str, int]]]:
    """Each `progress_many` round trip of `store`, as (job id, step) pairs."""
    trips: list[list[tuple[str, int]]] = []
    inner = store.progress_many
    lock = threading.Lock()

    async def progress_many(reports: Sequence[ProgressReport]) -> list[ProgressAck]:
        # the steps' round trips (a job's later phases, encoding and storing, are reports of their own)
        trip = [(r.lease.job.id, r.step) for r in reports if r.phase in ("denoising", "decoding")]
        with lock:
            if trip:
                trips.append(trip)
        return await inner(reports)

    store.progress_many = progress_many  # type: ignore[method-assign]
    return trips


async def test_a_calls_progress_is_one_round_trip_a_step_with_every_jobs_steps_in_order(store: JobStore) -> None:
    engine = StepEngine(step_seconds=0.03)
    trips = record_progress(store)
    ids = await submit_all(store, *(job_params(f"job {n}", steps=12) for n in range(8)))
    async with running(store, engine, max_batch_images=8):
        for job_id in ids:
            job = await wait_for(store, job_id, terminal)
            assert job.state == JobState.COMPLETED and job.step == 12
    assert engine.calls == [8]
    # one round trip per step at most (fewer when the store was slower than a step) ...
    assert 1 <= len(trips) <= 12, trips
    # ... each for several jobs, and every job's steps reach the store in order, up to the last
    assert max(len(trip) for trip in trips) == 8
    for job_id in ids:
        steps = [step for trip in trips for job, step in trip if job == job_id]
        assert steps == sorted(set(steps)) and steps[-1] == 12, steps


async def test_a_cancel_lands_within_one_step_and_the_rest_of_the_call_goes_on(store: JobStore) -> None:
    engine = StepEngine(step_seconds=0.05)
    ids = await submit_all(store, *(job_params(f"job {n}", steps=40) for n in range(3)))
    async with running(store, engine, max_batch_images=8):
        await wait_for(store, ids[1], lambda job: job.step >= 3)
        at_cancel = engine.step
        await store.request_cancel(ids[1])
        cancelled = await wait_for(store, ids[1], terminal)
        assert cancelled.state == JobState.FAILED and cancelled.error == "cancelled"
        # the report of the step under way brings the flag back; the next step's callback raises
        for _ in range(100):
            if "job 1" in engine.raised_at:
                break
            await asyncio.sleep(0.02)
        assert engine.raised_at["job 1"] <= at_cancel + 2, (engine.raised_at, at_cancel)
        for job_id in (ids[0], ids[2]):
            assert (await store.get(job_id)).state == JobState.PROCESSING  # type: ignore[union-attr]
        for job_id in (ids[0], ids[2]):
            done = await wait_for(store, job_id, terminal)
            assert done.state == JobState.COMPLETED and done.step == 40
    assert engine.calls == [3]


async def test_jobs_arriving_a_few_ms_apart_on_an_idle_worker_share_one_call(store: JobStore) -> None:
    """The auto wait rule (`kolors_api.jobs.batching`): the first job finds the worker idle and waits
    a fraction of a step for company; each arrival a few ms later extends the wait."""
    engine = StepEngine(step_seconds=0.1)
    async with running(store, engine, max_batch_images=8):
        first = await submit_all(store, job_params("warm-up", steps=4))
        await wait_for(store, first[0], terminal)  # the worker has measured a step (about 100 ms)
        ids = []
        for n in range(6):
            ids += await submit_all(store, job_params(f"burst {n}", steps=4))
            await asyncio.sleep(0.003)
        for job_id in ids:
            assert (await wait_for(store, job_id, terminal)).state == JobState.COMPLETED
    assert engine.calls == [1, 6]


async def test_a_round_goes_without_the_jobs_that_are_done_or_stopped(store: JobStore) -> None:
    """A job of the call that is already done (blocked by the prompt screening) or stopped reports no
    more steps: the others' rounds go at once, not after the straggler wait."""
    from kolors_api.worker.progress import CallReports, JobRun

    ids = await submit_all(store, *(job_params(f"job {n}", steps=4) for n in range(3)))
    leases = []
    for _ in ids:
        lease = await store.claim("w1", 30, 1)
        assert lease is not None
        leases.append(lease)
    reports = CallReports(store, asyncio.get_running_loop())
    reports.STRAGGLER_SECONDS = 600  # a round that waited for a straggler would not go in this test
    blocked, stopped, running_ = (JobRun(store, lease, reports) for lease in leases)
    blocked.done = True
    stopped.stop("cancelled")
    running_.on_step(1, 4)
    job = await wait_for(store, running_.job.id, lambda job: job.step == 1, timeout=30)
    assert job.state == JobState.PROCESSING
    await reports.settle()


class DeferredOut(Out):
    """An output whose images are encoded after the engine call (as the Kolors engine defers them)."""

    def __init__(self, params: GenerateParams) -> None:
        super().__init__(params)
        self.encode: Callable[[], list[bytes]] | None = lambda: [b"RIFF0000WEBP"] * params.number_of_images


class DeferringEngine(StepEngine):
    defer_encoding = True

    def generate_batch(self, jobs: Sequence[tuple[GenerateParams, Callable[..., None] | None]],
                       defer_encoding: bool = False) -> list[Any]:
        outs = super().generate_batch(jobs, defer_encoding)
        return [DeferredOut(params) if isinstance(out, Out) else out
                for out, (params, _) in zip(outs, jobs, strict=True)]


async def test_after_the_last_step_the_job_says_decoding_encoding_then_storing(store: JobStore) -> None:
    phases: list[tuple[int, str]] = []
    inner = store.progress_many

    async def progress_many(reports: Sequence[ProgressReport]) -> list[ProgressAck]:
        phases.extend((r.step, r.phase) for r in reports)
        return await inner(reports)

    store.progress_many = progress_many  # type: ignore[method-assign]
    ids = await submit_all(store, job_params("phases", steps=4))
    # someone follows the job (as an event stream does): every phase is said as it starts
    follower = asyncio.create_task(store.wait(ids[0], 0, 30, done=True))
    await wait_for(store, ids[0], lambda job: True)
    await asyncio.sleep(0.1)  # (the follower's first read marked the job followed)
    async with running(store, DeferringEngine(step_seconds=0.01), max_batch_images=1):
        done = await wait_for(store, ids[0], terminal)
    assert done.state == JobState.COMPLETED
    assert phases[-3:] == [(4, "decoding"), (4, "encoding"), (4, "storing")], phases
    assert {phase for step, phase in phases if step < 4} == {"denoising"}
    follower.cancel()


class SlowScreen:
    """Image screening that takes `seconds` and blocks nothing."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def check_prompt(self, params: GenerateParams) -> str | None:
        return None

    def check_images(self, images: list[bytes]) -> str | None:
        time.sleep(self.seconds)
        return None


async def test_a_storing_phase_nobody_follows_is_said_once_it_lasts(store: JobStore) -> None:
    """`storing` (the screening and the store of the outcome) is said at once while someone follows the
    job (`ProgressAck.followed`; a store that cannot tell says someone does); a phase nobody follows is
    said only once it lasted `QUIET_PHASE_SECONDS`: one over sooner costs no round trip (the outcome
    follows at once), one that lasts is said while it lasts."""
    from kolors_api.jobs.redis import RedisStore
    from kolors_api.worker.loop import Worker, WorkerConfig

    phases: dict[str, list[str]] = {}
    inner = store.progress_many

    async def progress_many(reports: Sequence[ProgressReport]) -> list[ProgressAck]:
        for r in reports:
            phases.setdefault(r.lease.job.id, []).append(r.phase)
        return await inner(reports)

    store.progress_many = progress_many  # type: ignore[method-assign]
    [quick] = await submit_all(store, job_params("quick", steps=2))
    engine = StepEngine(step_seconds=0.01)
    async with running(store, engine, max_batch_images=1):
        assert (await wait_for(store, quick, terminal)).state == JobState.COMPLETED
    told = isinstance(store, RedisStore)  # (the SQLite store cannot tell: someone follows, it says)
    assert phases[quick][-1] == ("decoding" if told else "storing"), phases[quick]
    [slow] = await submit_all(store, job_params("slow", steps=2))
    worker = Worker(store, lambda: engine, WorkerConfig(heartbeat_seconds=0.3, claim_timeout=0.2,
                                                        max_batch_images=1), safety=SlowScreen(0.3))
    task = asyncio.create_task(worker.run())
    try:
        seen: list[str] = []
        while not (job := await wait_for(store, slow, lambda job: True)).state.terminal:
            if job.phase:
                seen.append(job.phase)
            await asyncio.sleep(0.02)
        assert job.state == JobState.COMPLETED
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    assert phases[slow][-1] == "storing" and "storing" in seen, (phases[slow], seen)


async def test_each_finished_job_is_one_info_line(store: JobStore, caplog: pytest.LogCaptureFixture) -> None:
    from kolors_api.jobs import make_key_record, new_key

    key = make_key_record("alice", new_key(), credits=100.0)
    await store.add_key(key)
    ids = await submit_all(store, job_params("logged", steps=3), job_params("cancelled", steps=200), key_id=key.id)
    caplog.set_level("INFO", logger="kolors_api.worker")
    async with running(store, StepEngine(step_seconds=0.01), max_batch_images=1):
        await wait_for(store, ids[0], terminal)
        await wait_for(store, ids[1], lambda job: job.step >= 1)
        await store.request_cancel(ids[1])
        await wait_for(store, ids[1], terminal)
        for _ in range(200):
            if sum("job " in r.getMessage() and "key alice" in r.getMessage() for r in caplog.records) >= 2:
                break
            await asyncio.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ") and "key " in r.getMessage()]
    assert len(lines) == 2, lines
    done = next(line for line in lines if ids[0] in line)
    assert re.fullmatch(rf"job {ids[0]} key alice: 256x256 x1, 3 steps, queued \d+\.\d\d s, ran \d+\.\d\d s: "
                        r"COMPLETED", done), done
    cancelled = next(line for line in lines if ids[1] in line)
    assert "key alice: 256x256 x1, 200 steps" in cancelled and cancelled.endswith("FAILED: cancelled"), cancelled
