"""Storing a finished job through an outage of the stores, without running the model again.

`commit(store, lease, ...)` is `store.complete(...)` that, when the blob store (S3, a shared folder)
or the job store cannot be reached, keeps the finished images in memory and tries again with
backoff (1, 2, 4… up to 15 s between tries) for at most `COMMIT_RETRY_SECONDS`, while the worker's
heartbeats keep the job's lease. The first failure is logged in one line, the outcome in another.
An outage that outlasts the bound ends the job FAILED with an error that says the store was
unreachable (refunded), not as a lost worker; a lease lost meanwhile (the job store gone too long)
is the store's usual redelivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kolors_api.jobs import JobStore, Lease
from kolors_api.jobs.outage import describe, is_outage

log = logging.getLogger("kolors_api.worker")

#: How long a finished job's images wait in memory for the stores to come back.
COMMIT_RETRY_SECONDS = 300.0
#: Seconds between tries, doubling from the first to the last.
FIRST_DELAY, MAX_DELAY = 1.0, 15.0


async def commit(store: JobStore, lease: Lease, images: list[bytes], ext: str, seeds: list[int],
                 metrics: dict[str, Any], *, bound: float = COMMIT_RETRY_SECONDS) -> bool | None:
    """`store.complete(lease, images, ext, seeds, metrics)`, tried again through a store outage; None
    when the outage outlasted `bound` and the job was ended FAILED instead."""
    started, delay, tries = time.monotonic(), FIRST_DELAY, 0
    while True:
        tries += 1
        try:
            done = await store.complete(lease, images, ext, seeds, metrics)
        except Exception as exc:
            if not is_outage(exc):
                raise
            waited = time.monotonic() - started
            if tries == 1:
                log.warning("job %s could not be stored (%s); its images are kept and storing is tried again "
                            "for up to %.0fs", lease.job.id, describe(exc), bound)
            if waited + delay > bound:
                log.error("job %s: the stores were unreachable for %.0fs; it ends FAILED (refunded)",
                          lease.job.id, waited)
                await store.fail(lease, f"store unavailable: the images could not be stored for {waited:.0f}s; "
                                        "submit the request again")
                return None
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY, delay * 2)
            continue
        if tries > 1:
            log.warning("job %s stored after %d tries (%.0fs)", lease.job.id, tries, time.monotonic() - started)
        return done
