"""Test helpers for the job stores: cleaning a Redis store's keys away, watching job states."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from kolors_api.jobs import Job, JobState, JobStore, Lease, can_transition

#: The store methods after which the watcher re-reads every job it knows.
CHANGES = ("submit", "request_cancel", "claim", "heartbeat", "progress", "progress_many", "complete", "fail", "expire")
#: The store methods whose answers carry jobs.
READS = ("get", "wait", "history")


async def delete_redis_keys(store: Any) -> None:
    """Delete every key under a RedisStore's prefix (the test's own; never FLUSHALL)."""
    from redis.asyncio import Redis

    client = Redis.from_url(store.url)
    try:
        found = [key async for key in client.scan_iter(match=store.keys.everything, count=500)]
        for i in range(0, len(found), 500):
            await client.unlink(*found[i:i + 500])
    finally:
        await client.aclose()


class StateWatch:
    """Sees every state a job of `store` goes through in a test, and fails at once on a change that
    `TRANSITIONS` does not allow.

    It wraps the store's methods on the instance: after each call that may change jobs it re-reads
    every job it knows, and it reads the jobs in every answer. A change of state must come with a
    higher version; a new delivery of a PROCESSING job is a reclaim (PROCESSING → QUEUED → PROCESSING).
    """

    def __init__(self, store: JobStore) -> None:
        self._get = store.get
        self.seen: dict[str, Job] = {}
        #: Every (old, new) pair seen, reclaims as their two steps.
        self.pairs: set[tuple[JobState, JobState]] = set()
        for name in CHANGES + READS:
            setattr(store, name, self._wrap(name, getattr(store, name)))

    def _wrap(self, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kw: Any) -> Any:
            result = await method(*args, **kw)
            self.observe(result)
            if name in CHANGES:
                for job_id in list(self.seen):
                    self.observe(await self._get(job_id))
            return result
        return call

    def observe(self, value: object) -> None:
        """Take note of the jobs in a store's answer (a Job, a Lease, a history page, or None)."""
        if isinstance(value, list | tuple):
            for item in value:
                self.observe(item)
        elif isinstance(value, Lease):
            self.observe(value.job)
        elif isinstance(value, Job):
            self._check(value)

    def _check(self, job: Job) -> None:
        old = self.seen.get(job.id)
        if old is None:
            self.seen[job.id] = job
            return
        if job.version <= old.version:  # an older answer than one already seen
            assert job.version < old.version or job.state == old.state, f"{job.id}: state moved, version did not"
            return
        steps = [(old.state, job.state)] if job.state != old.state else []
        if job.state == old.state == JobState.PROCESSING and job.deliveries > old.deliveries:
            steps = [(JobState.PROCESSING, JobState.QUEUED), (JobState.QUEUED, JobState.PROCESSING)]
        for step in steps:
            assert can_transition(*step), f"{job.id}: {step[0]} -> {step[1]} is not in TRANSITIONS"
            self.pairs.add(step)
        self.seen[job.id] = job
