"""The job store interface and its backends; `make_store` opens the one the settings name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kolors_api.jobs.base import (
    KEY_FIELDS,
    TRANSITIONS,
    AlreadyExists,
    ApiKey,
    BalanceOutOfRange,
    IdempotencyMismatch,
    InsufficientFunds,
    Job,
    JobState,
    JobStore,
    Lease,
    LedgerEntry,
    NewJob,
    ProgressAck,
    ProgressReport,
    QueueFull,
    StoreError,
    StoreStats,
    TooManyRunning,
    WebhookAttempt,
    WebhookDelivery,
    can_transition,
    hash_key,
    make_key_record,
    new_key,
)

if TYPE_CHECKING:  # the client side (kolors-api generate) imports jobs.base on httpx alone: no pydantic
    from kolors_api.settings import Settings

__all__ = [
    "KEY_FIELDS", "TRANSITIONS", "AlreadyExists", "ApiKey", "BalanceOutOfRange", "IdempotencyMismatch",
    "InsufficientFunds", "Job",
    "JobState", "JobStore", "Lease", "LedgerEntry", "NewJob", "ProgressAck", "ProgressReport",
    "QueueFull", "StoreError", "StoreStats", "TooManyRunning",
    "WebhookAttempt", "WebhookDelivery",
    "can_transition", "hash_key", "make_key_record", "new_key", "make_store",
]


def make_store(settings: Settings, *, recover: bool = False) -> JobStore:
    """The store of `settings.store`: SQLiteStore at `settings.sqlite_path()`, or RedisStore.

    It reads store, data_dir, retention_seconds, max_deliveries and blob_dir. `recover=True` (the
    `serve` process that runs the only worker) re-queues SQLite jobs left PROCESSING by a crash."""
    if settings.fleet:
        from kolors_api.jobs.redis import RedisStore

        return RedisStore(settings.store, retention=settings.retention_seconds,
                          max_deliveries=settings.max_deliveries, blob_dir=settings.blob_dir)
    from kolors_api.jobs.sqlite import SQLiteStore

    return SQLiteStore(settings.sqlite_path(), retention=settings.retention_seconds,
                       max_deliveries=settings.max_deliveries, recover=recover)
