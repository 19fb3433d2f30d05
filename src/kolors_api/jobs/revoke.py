"""What disabling or deleting an API key does to its work: nothing of it runs or goes out after.

`revoke_key(store, key_id, enabled=False | delete=True)` writes the change, then cancels every job of
the key that is still QUEUED (FAILED "cancelled" at once, refunded) or PROCESSING (stopped at its
next step, FAILED "cancelled", refunded): a revoked key's backlog takes no worker's time and no
credits. Enabling the key again resumes nothing (its jobs were cancelled; submit them again). The
webhook runner sends nothing for a job whose key is disabled or gone, and signed output URLs of such
a job answer 403 (`key_is_live`), so a job that finished in between leaks nothing either.
"""

from __future__ import annotations

from kolors_api.jobs.base import ApiKey, JobStore


async def cancel_jobs_of(store: JobStore, key_id: str) -> int:
    """Cancel every queued or running job of the key; how many there were."""
    cancelled, cursor = 0, None
    while True:
        jobs, cursor = await store.history(key_id, 100, cursor)
        for job in jobs:
            if not job.state.terminal:
                await store.request_cancel(job.id)
                cancelled += 1
        if cursor is None:
            return cancelled


async def disable_key(store: JobStore, key_id: str, **changes: object) -> ApiKey | None:
    """`store.update_key(key_id, enabled=False, **changes)`, then the key's jobs cancelled."""
    record = await store.update_key(key_id, enabled=False, **changes)
    if record is not None:
        await cancel_jobs_of(store, key_id)
    return record


async def delete_key(store: JobStore, key_id: str) -> bool:
    """Disable the key, cancel its jobs, then `store.delete_key(key_id)`; False for an unknown key."""
    if await store.update_key(key_id, enabled=False) is None:
        return False
    await cancel_jobs_of(store, key_id)
    return await store.delete_key(key_id)


async def key_is_live(store: JobStore, key_id: str | None) -> bool:
    """Whether results of the key's jobs may still go out: the key exists and is enabled (a job
    without a key, made by the store's own tests, always may)."""
    if not key_id:
        return True
    key = await store.get_key(key_id)
    return key is not None and key.enabled
