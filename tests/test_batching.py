"""The worker's batching on both stores, with the real tiny engine: which jobs share a call, and
that each job of a batch keeps its own outcome, cancellation and lease."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kolors_api.engine import Engine
from kolors_api.jobs import Job, JobState, JobStore, NewJob, make_key_record, new_key
from kolors_api.jobs.batching import BatchLimits
from kolors_api.schema import GenerateParams
from kolors_api.worker import Worker, WorkerConfig
from kolors_api.worker.progress import CALLS
from tests.test_store import drop, make

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine(str(tiny_model), device="cpu")


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    s = await make(request.param, tmp_path)
    yield s
    await drop(s)


class Recorder:
    """The real engine; records the prompts of each call, and sleeps `step_seconds` after each step."""

    def __init__(self, inner: Engine, step_seconds: float = 0.0) -> None:
        self.inner = inner
        self.step_seconds = step_seconds
        self.calls: list[list[str]] = []

    def batch_limits(self) -> BatchLimits:
        return self.inner.batch_limits()

    def _slow(self, on_step: Callable[..., None] | None) -> Callable[..., None]:
        def step(i: int, total: int, preview: Any = None) -> None:
            time.sleep(self.step_seconds)
            if on_step is not None:
                on_step(i, total, preview)
        return step

    def generate(self, params: GenerateParams, on_step: Callable[..., None] | None = None) -> Any:
        self.calls.append([params.prompt])
        return self.inner.generate(params, self._slow(on_step))

    def generate_batch(self, jobs: list[tuple[GenerateParams, Any]]) -> list[Any]:
        self.calls.append([params.prompt for params, _ in jobs])
        return self.inner.generate_batch([(params, self._slow(on_step)) for params, on_step in jobs])


def job_params(prompt: str, *, width: int = 256, steps: int = 2, **kw: Any) -> dict[str, Any]:
    return GenerateParams(prompt=prompt, width=width, height=256, steps=steps, seed=len(prompt), **kw).to_dict()


@contextlib.asynccontextmanager
async def running(store: JobStore, engine: Any, **config: Any) -> AsyncIterator[Worker]:
    worker = Worker(store, lambda: engine, WorkerConfig(heartbeat_seconds=0.3, claim_timeout=0.2, **config))
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def wait_for(store: JobStore, job_id: str, done: Callable[[Job], bool], timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await store.get(job_id)
        if job is not None and done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id}: {job}"
        await asyncio.sleep(0.02)


def terminal(job: Job) -> bool:
    return job.state.terminal


async def submit_all(store: JobStore, *jobs: dict[str, Any], key_id: str | None = None) -> list[str]:
    return [(await store.submit(NewJob(model="kolors", params=p, cost=1.0, key_id=key_id))).id for p in jobs]


async def test_queued_jobs_of_one_shape_share_a_call_and_each_keeps_its_own_outcome(
        store: JobStore, engine: Engine) -> None:
    key = make_key_record("batch", new_key(), credits=100.0)
    await store.add_key(key)
    recorder = Recorder(engine)
    before = dict(CALLS)
    ids = await submit_all(store, job_params("x1"), job_params("y1", width=320), job_params("x2", number_of_images=2),
                           job_params("x3", output_format="png", negative_prompt="dull"),
                           job_params("y2", width=320), key_id=key.id)
    async with running(store, recorder, max_batch_images=8):
        jobs = [await wait_for(store, i, terminal) for i in ids]
    assert recorder.calls == [["x1", "x2", "x3"], ["y1", "y2"]]
    # the engine-call counters of /metrics (kolors_engine_call_*): 2 calls, 5 jobs, 6 images
    assert {name: CALLS[name] - before[name] for name in CALLS} == {"calls": 2, "jobs": 5, "images": 6}
    assert [j.state for j in jobs] == [JobState.COMPLETED] * 5
    assert [j.outputs for j in jobs] == [1, 1, 2, 1, 1]
    assert jobs[2].seeds == [2, 3] and jobs[3].ext == "png" and jobs[0].ext == "webp"
    png = await store.read_output(ids[3], 0)
    assert png is not None and png.startswith(b"\x89PNG")
    captures = [e for e in await store.ledger(key.id) if e.kind == "capture"]
    assert sorted(e.request_id for e in captures) == sorted(ids)  # one capture per job


async def test_mixed_shapes_never_starve_and_batching_off_keeps_fifo(store: JobStore, engine: Engine) -> None:
    shapes = {"x": 256, "y": 320}
    order = ["x1", "y1", "x2", "x3", "y2", "x4", "z1"]
    recorder = Recorder(engine)

    def p(name: str) -> dict[str, Any]:
        return job_params(name, width=shapes.get(name[0], 384))

    ids = await submit_all(store, *map(p, order))
    async with running(store, recorder, max_batch_images=8):
        for i in ids:
            await wait_for(store, i, terminal)
    # y1 waits behind the head's batch only (which took x2..x4 past it), then heads the next one
    assert recorder.calls == [["x1", "x2", "x3", "x4"], ["y1", "y2"], ["z1"]]
    off = Recorder(engine)
    ids = await submit_all(store, *map(p, order))
    async with running(store, off, max_batch_images=1):
        for i in ids:
            await wait_for(store, i, terminal)
    assert off.calls == [[name] for name in order]


async def test_cancelling_one_job_of_a_running_batch_ends_it_at_once_and_the_others_go_on(
        store: JobStore, engine: Engine) -> None:
    key = make_key_record("cancel", new_key(), credits=100.0)
    await store.add_key(key)
    recorder = Recorder(engine, step_seconds=0.1)
    a, b, c = await submit_all(store, *(job_params(n, steps=12) for n in ("a", "b", "c")), key_id=key.id)
    async with running(store, recorder, max_batch_images=8):
        await wait_for(store, b, lambda j: j.step >= 2)
        await store.request_cancel(b)
        cancelled = await wait_for(store, b, terminal, timeout=10)
        others = [await store.get(a), await store.get(c)]
        assert cancelled.state == JobState.FAILED and cancelled.error == "cancelled" and cancelled.outputs == 0
        assert all(o is not None and o.state == JobState.PROCESSING for o in others)  # still running
        done = [await wait_for(store, i, terminal) for i in (a, c)]
    assert recorder.calls == [["a", "b", "c"]]
    assert [j.state for j in done] == [JobState.COMPLETED] * 2 and all(j.outputs == 1 for j in done)
    refunds = [e.request_id for e in await store.ledger(key.id) if e.kind == "refund"]
    assert refunds == [b]
    after = await store.get(b)
    assert after is not None and after.state == JobState.FAILED and after.outputs == 0


async def steal_lease(store: JobStore, job_id: str) -> None:
    """Another worker took this job over (its lease token changed under the worker)."""
    if hasattr(store, "keys"):  # Redis
        await (await store._conn()).hset(store.keys.job(job_id), "lease_token", "stolen")  # type: ignore[attr-defined]
    else:
        with contextlib.closing(sqlite3.connect(store.path)) as c:  # type: ignore[attr-defined]
            c.execute("UPDATE jobs SET lease_token='stolen' WHERE id=?", (job_id,))
            c.commit()


async def test_a_lost_lease_drops_only_that_jobs_result(store: JobStore, engine: Engine) -> None:
    recorder = Recorder(engine, step_seconds=0.1)
    a, b, c = await submit_all(store, *(job_params(n, steps=8) for n in ("a", "b", "c")))
    async with running(store, recorder, max_batch_images=8):
        await wait_for(store, b, lambda j: j.step >= 2)
        await steal_lease(store, b)
        done = [await wait_for(store, i, terminal) for i in (a, c)]
        await asyncio.sleep(0.5)
        lost = await store.get(b)
    assert recorder.calls == [["a", "b", "c"]]
    assert [j.state for j in done] == [JobState.COMPLETED] * 2
    assert lost is not None and lost.state == JobState.PROCESSING and lost.outputs == 0 and lost.step < 8


async def test_batch_wait_ms_lets_a_job_wait_for_company(store: JobStore, engine: Engine) -> None:
    recorder = Recorder(engine)
    async with running(store, recorder, max_batch_images=8, batch_wait_ms=1500):
        (first,) = await submit_all(store, job_params("w1"))
        await asyncio.sleep(0.4)
        (second,) = await submit_all(store, job_params("w2"))
        for i in (first, second):
            await wait_for(store, i, terminal)
    assert recorder.calls == [["w1", "w2"]]


async def test_an_engine_without_generate_batch_runs_one_job_a_call(store: JobStore, engine: Engine) -> None:
    class OneAtATime:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def generate(self, params: GenerateParams, on_step: Any = None) -> Any:
            self.calls.append(params.prompt)
            return engine.generate(params, on_step)

    single = OneAtATime()
    ids = await submit_all(store, job_params("s1"), job_params("s2"))
    async with running(store, single, max_batch_images=8) as worker:
        for i in ids:
            await wait_for(store, i, terminal)
        assert worker.batch_limits() == BatchLimits()
    assert single.calls == ["s1", "s2"]


def test_the_engine_sizes_its_batches_for_the_device(engine: Engine) -> None:
    limits = engine.batch_limits()
    assert limits.max_images == 8 and limits.max_pixels == 4 * 1024 * 1024  # CPU
