"""Telling a store outage from a bug, and logging an outage once rather than once per request.

An outage is the store being unreachable or unable to write for a while: Redis down, restarting,
loading or read-only; SQLite's "database is locked", a disk I/O error, a full or read-only disk;
the object store of the images (S3) unreachable or failing (`BlobUnavailable`, which that store
logs itself, once per outage).
The API answers it with 503 and Retry-After (`kolors_api.errors.store_unavailable`); the API and
the workers go on by themselves when the store is back. Anything else is a bug (500, traceback).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time

#: Redis replies that mean "not now" rather than "wrong" (redis-py raises them as ResponseError).
_REDIS_BUSY = ("LOADING", "MISCONF", "OOM", "READONLY", "MASTERDOWN", "BUSY ", "TRYAGAIN", "CLUSTERDOWN")


class BlobUnavailable(Exception):  # noqa: N818 - a state, like the store outcomes
    """The object store of the images cannot be reached or refuses for now (S3 down, throttling,
    credentials that stopped working). The blob store that raises it has logged the outage already."""


def is_outage(exc: BaseException) -> bool:
    """True when `exc` says the store cannot be reached or cannot write now (not a bug)."""
    if isinstance(exc, BlobUnavailable):
        return True
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        return True
    if isinstance(exc, OSError):  # refused or reset connections, a full disk under the blob store
        return True
    redis_errors = sys.modules.get("redis.exceptions")  # only when the Redis store is in use
    if redis_errors is not None:
        if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
            return True
        if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(_REDIS_BUSY):
            return True
    return False


def describe(exc: BaseException) -> str:
    """One line naming the cause: `ConnectionError: Error 111 connecting to 127.0.0.1:6391.`"""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class Outage:
    """One warning when the store goes away and one when it is back, whatever happens between.

    `failed(exc)` for every outage error; `ok()` after a success. The outage ends only when a
    success comes `settle` seconds after the last failure, so a flapping store (a lock that comes
    and goes) does not write a pair of lines per request."""

    def __init__(self, log: logging.Logger, what: str = "job store", settle: float = 5.0,
                 meanwhile: str = "answering 503 until it is back", *, blob_store: bool = False) -> None:
        self.log = log
        #: The blob store's own tracker; every other one leaves `BlobUnavailable` to it.
        self.blob_store = blob_store
        self.what = what
        self.meanwhile = meanwhile
        self.settle = settle
        self.since: float | None = None
        self.last: float = 0.0
        self.errors = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, BlobUnavailable) and not self.blob_store:
            return  # the blob store keeps its own outage (and its one line)
        now = time.monotonic()
        self.last = now
        self.errors += 1
        if self.since is None:
            self.since = now
            self.log.warning("%s unavailable: %s (%s; not logged again)", self.what, describe(exc),
                             self.meanwhile)

    def ok(self) -> None:
        if self.since is None or time.monotonic() - self.last < self.settle:
            return
        self.log.warning("%s available again after %.0fs (%d errors meanwhile)", self.what,
                         time.monotonic() - self.since, self.errors)
        self.since = None
        self.errors = 0
