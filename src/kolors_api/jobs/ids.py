"""Job ids: 32 hex digits, as `uuid.uuid4().hex` makes them, drawn cheaply on the submit path."""

from __future__ import annotations

import os
import threading


class _Ids:
    """Random job ids as `uuid.uuid4().hex` makes them (32 hex digits, version 4, RFC 4122 variant),
    from os.urandom read 256 ids at a time: one getrandom call, which lets go of the GIL, per id is a
    wait for the GIL on a busy submit path. A forked child starts with nothing read."""

    BATCH = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._at = b"", 0

    def __call__(self) -> str:
        with self._lock:
            if self._at >= len(self._pool):
                self._pool, self._at = os.urandom(16 * self.BATCH), 0
            raw = bytearray(self._pool[self._at:self._at + 16])
            self._at += 16
        raw[6] = raw[6] & 0x0F | 0x40  # version 4
        raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
        return raw.hex()


#: A new job id (`NewJob.id`).
new_job_id = _Ids()
