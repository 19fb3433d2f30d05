"""The job store interface and its backends; `make_store` opens the one the settings name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

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
from kolors_api.jobs.blobs import BlobDir, Blobs

if TYPE_CHECKING:  # the client side (kolors-api generate) imports jobs.base on httpx alone: no pydantic
    from kolors_api.settings import Settings

__all__ = [
    "KEY_FIELDS", "TRANSITIONS", "AlreadyExists", "ApiKey", "BalanceOutOfRange", "IdempotencyMismatch",
    "InsufficientFunds", "Job",
    "JobState", "JobStore", "Lease", "LedgerEntry", "NewJob", "ProgressAck", "ProgressReport",
    "QueueFull", "StoreError", "StoreStats", "TooManyRunning",
    "WebhookAttempt", "WebhookDelivery",
    "can_transition", "hash_key", "make_key_record", "new_key", "make_store", "make_blobs",
]


def make_blobs(url: str) -> Blobs:
    """The blob store of a `--blob-url`: `file:///DIR` or `s3://BUCKET/PREFIX` (needs boto3, the `s3`
    extra, imported only here: ModuleNotFoundError without it)."""
    from kolors_api.settings import check_blob_url

    check_blob_url(url)
    if url.startswith("file://"):
        return BlobDir(Path(unquote(urlsplit(url).path)))
    from kolors_api.jobs.blobs_s3 import S3Blobs

    return S3Blobs(url)


def make_store(settings: Settings, *, recover: bool = False) -> JobStore:
    """The store of `settings.store`: SQLiteStore at `settings.sqlite_path()`, or RedisStore.

    It reads store, data_dir, retention_seconds, max_deliveries and blob_url (or blob_dir).
    `recover=True` (the `serve` process that runs the only worker) re-queues SQLite jobs left
    PROCESSING by a crash. An s3:// blob URL needs boto3 (the `s3` extra): ModuleNotFoundError."""
    url = settings.blobs_url()
    blobs = make_blobs(url) if url else None
    if settings.fleet:
        from kolors_api.jobs.redis import RedisStore

        return RedisStore(settings.store, retention=settings.retention_seconds,
                          max_deliveries=settings.max_deliveries, blobs=blobs)
    from kolors_api.jobs.sqlite import SQLiteStore

    return SQLiteStore(settings.sqlite_path(), retention=settings.retention_seconds,
                       max_deliveries=settings.max_deliveries, recover=recover, blobs=blobs)
