"""API key records by key hash, kept in one process of the Redis fleet so that a request's
authentication costs no round trip.

Only records without credits are kept (a balance moves with every submit; the rest of a record
changes only through `update_key` and `delete_key`). Every change of a key record publishes on the
``keys-changed`` channel (`SCRIPT_UPDATE_KEY`, `SCRIPT_DELETE_KEY`), and every store subscribed there
empties its cache when it hears one, or when its subscription breaks; records are kept only while the
subscription is confirmed and unbroken. A change made through this store empties its cache at once;
another process hears it within the publication's latency (well under a millisecond on one network),
so a revoked key is refused from then on. A record is kept `SECONDS` at most in any case.
"""

from __future__ import annotations

import time

from kolors_api.jobs.base import ApiKey


class KeyCache:
    """Key records by key hash (see the module docstring)."""

    #: The longest a record is kept, in seconds.
    SECONDS = 60.0

    def __init__(self) -> None:
        self._records: dict[str, tuple[ApiKey, float]] = {}
        #: Moves with every change heard: a read that began before one is not kept.
        self.generation = 0
        #: The ``keys-changed`` subscription is confirmed and unbroken.
        self.heard = False

    def get(self, key_hash: str) -> ApiKey | None:
        found = self._records.get(key_hash)
        if found is None or not self.heard or found[1] < time.monotonic():
            return None
        return found[0]

    def put(self, key_hash: str, record: ApiKey, generation: int) -> None:
        """Keep `record`, read after `generation` was current, if nothing changed since."""
        if record.credits is None and self.heard and generation == self.generation:
            if len(self._records) > 10_000:
                self._records.clear()
            self._records[key_hash] = (record, time.monotonic() + self.SECONDS)

    def changed(self) -> None:
        """A key record changed (or a change may have been missed): keep nothing read before."""
        self.generation += 1
        self._records.clear()

    def listening(self, heard: bool) -> None:
        self.heard = heard
        if not heard:
            self.changed()
