"""Signed, expiring output URLs: the link works in an `<img>` tag without a header, until expiry."""

from __future__ import annotations

import hashlib
import hmac
import time

from kolors_api.schema import decimal


class Signer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, path: str, expires: int) -> str:
        msg = f"{path}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def query(self, path: str, expires: float) -> str:
        exp = int(expires)
        return f"exp={exp}&sig={self.sign(path, exp)}"

    def check(self, path: str, exp: str | None, sig: str | None) -> str:
        """"ok", "expired" (authentic but past its time: the result is gone) or "bad"."""
        expires = decimal(exp)
        if expires is None or not sig or not hmac.compare_digest(self.sign(path, expires), sig):
            return "bad"
        return "ok" if expires >= time.time() else "expired"
