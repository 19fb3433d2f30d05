"""The job store interface and its backends; `make_store` opens the one the settings name."""

from __future__ import annotations

from pathlib import Path
from typing import overload

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
from kolors_api.settings import Settings

__all__ = [
    "KEY_FIELDS", "TRANSITIONS", "AlreadyExists", "ApiKey", "InsufficientFunds", "Job", "JobState", "JobStore",
    "Lease", "LedgerEntry", "NewJob", "QueueFull", "StoreError", "StoreStats", "TooManyRunning",
    "can_transition", "hash_key", "make_key_record", "new_key", "make_store",
]


@overload
def make_store(settings: Settings, *, recover: bool = False) -> JobStore: ...


@overload
def make_store(settings: str, *, data_dir: Path, retention: float = 3600.0, max_deliveries: int = 3,
               blob_dir: Path | None = None, recover: bool = False) -> JobStore: ...


def make_store(settings: Settings | str, *, recover: bool = False, data_dir: Path | None = None,
               retention: float = 3600.0, max_deliveries: int = 3, blob_dir: Path | None = None) -> JobStore:
    """The store of `settings.store`: SQLiteStore at `settings.sqlite_path()`, or RedisStore.

    It reads store, data_dir, retention_seconds, max_deliveries and blob_dir. `recover=True` (the
    `serve` process that runs the only worker) re-queues SQLite jobs left PROCESSING by a crash.
    The older form `make_store(url, data_dir=…, retention=…, …)` still works, for now."""
    if isinstance(settings, str):
        settings = Settings(store=settings, data_dir=data_dir or Path(".kolors-api"), retention_seconds=retention,
                            max_deliveries=max_deliveries, blob_dir=blob_dir)
    if settings.fleet:
        from kolors_api.jobs.redis import RedisStore

        return RedisStore(settings.store, retention=settings.retention_seconds,
                          max_deliveries=settings.max_deliveries, blob_dir=settings.blob_dir)
    from kolors_api.jobs.sqlite import SQLiteStore

    return SQLiteStore(settings.sqlite_path(), retention=settings.retention_seconds,
                       max_deliveries=settings.max_deliveries, recover=recover)
