"""The job store interface and its backends; `open_store` picks one from a URL."""

from __future__ import annotations

from pathlib import Path

from kolors_api.jobs.base import (
    KEY_FIELDS,
    TRANSITIONS,
    AlreadyExists,
    ApiKey,
    InsufficientFunds,
    Job,
    JobState,
    JobStore,
    Lease,
    LedgerEntry,
    NewJob,
    QueueFull,
    StoreError,
    StoreStats,
    TooManyRunning,
    can_transition,
    hash_key,
    make_key_record,
    new_key,
)

__all__ = [
    "KEY_FIELDS", "TRANSITIONS", "AlreadyExists", "ApiKey", "InsufficientFunds", "Job", "JobState", "JobStore",
    "Lease", "LedgerEntry", "NewJob", "QueueFull", "StoreError", "StoreStats", "TooManyRunning",
    "can_transition", "hash_key", "make_key_record", "new_key", "make_store",
]


def make_store(url: str, *, data_dir: Path, retention: float = 3600.0, max_deliveries: int = 3,
               blob_dir: Path | None = None, recover: bool = False) -> JobStore:
    """`sqlite` (or `sqlite:///path`) → SQLiteStore under data_dir; `redis://…` → RedisStore."""
    if url.startswith("redis://") or url.startswith("rediss://") or url.startswith("unix://"):
        from kolors_api.jobs.redis import RedisStore

        return RedisStore(url, retention=retention, max_deliveries=max_deliveries, blob_dir=blob_dir)
    from kolors_api.jobs.sqlite import SQLiteStore

    path = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else data_dir / "kolors-api.sqlite3"
    return SQLiteStore(path, retention=retention, max_deliveries=max_deliveries, recover=recover)
