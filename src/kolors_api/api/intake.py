"""Image intake: every picture field of a request (`image`, `ip_adapter_image`) taken once, at submit.

A value is base64, a data URI (`data:image/png;base64,…`) or an http(s) URL. URLs are fetched
here, by the API (workers need no internet), through the webhooks' SSRF guard (`api/ssrf.py`):
the host's addresses are checked before the fetch and again at connect time (the address dialled
is the one checked), private, loopback and link-local addresses are refused unless the host is in
`KOLORS_API_FETCH_ALLOW_HOSTS`, at most `MAX_REDIRECTS` redirects are followed, each checked again,
the body may hold at most `max_bytes` and the whole fetch takes at most `timeout` seconds. The
bytes are then opened with `kolors_api.images.open_image` (format list, size from the header
before decoding, EXIF orientation, first frame), in a thread. Every refusal is a `BadRequest`
naming the field and what is wrong.

What comes out (`Picture`) is the bytes as they came and their sha256: the store keeps the bytes
with the job (`JobStore.write_inputs`), the job's record keeps the sha256.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urljoin

import httpcore

from kolors_api.api.ssrf import Blocked, GuardedBackend, Policy, Resolver, check_webhook_url, split_url, system_resolve
from kolors_api.errors import BadRequest
from kolors_api.images import header_size, open_image
from kolors_api.schema import clip

MAX_REDIRECTS = 3
_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Picture:
    """A taken picture: its bytes as they came, their sha256, and its upright size."""

    data: bytes
    sha256: str
    width: int
    height: int


def megabytes(n: int) -> str:
    return f"{n / 2**20:g} MB"


def refused(field: str, host: str, exc: Blocked) -> BadRequest:
    """The 400 of a URL the SSRF guard refused (or whose host does not resolve)."""
    why = str(exc)
    if why.endswith("does not resolve") or why.endswith("to no address"):
        return BadRequest(f"{field}: {why}")
    return BadRequest(f"{field}: host {clip(host)} is not allowed ({why}; an operator may allow it with "
                      f"KOLORS_API_FETCH_ALLOW_HOSTS)")


class Intake:
    """Takes picture fields: `await intake.take("image", value)` -> `Picture`, or a 400 naming the field."""

    def __init__(self, policy: Policy | None = None, resolve: Resolver = system_resolve, *,
                 max_bytes: int = 10 * 2**20, timeout: float = 15.0) -> None:
        self.policy = policy or Policy()
        self.resolve = resolve
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._pool: httpcore.AsyncConnectionPool | None = None

    def _connections(self) -> httpcore.AsyncConnectionPool:
        if self._pool is None:
            self._pool = httpcore.AsyncConnectionPool(network_backend=GuardedBackend(self.policy, self.resolve),
                                                      retries=0, max_keepalive_connections=0)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    async def take(self, field: str, value: str) -> Picture:
        data = await self.read(field, value)
        return await asyncio.to_thread(self.check, field, data)

    def check(self, field: str, data: bytes) -> Picture:
        """Open the bytes as the worker will (a 400 naming `field` if they are no picture we take)."""
        header_size(data, field)  # refuse a huge header before anything is decoded
        image = open_image(data, field)
        return Picture(data, hashlib.sha256(data).hexdigest(), image.width, image.height)

    async def read(self, field: str, value: str) -> bytes:
        """The bytes a field's value stands for: decoded base64 or data URI, or the URL's body."""
        head = value[:8].lower()
        if head.startswith(("http://", "https://")):
            return await self.fetch(field, value)
        if head.startswith("data:"):
            match = _DATA_URI.match(value, 0, 200)
            if match is None:
                raise BadRequest(f"{field}: a data URI must be base64 (data:image/png;base64,…)")
            value = value[match.end():]
        elif "://" in value[:20]:
            raise BadRequest(f"{field}: must be an http or https URL, base64 or a data URI, "
                             f"got scheme {clip(value.split('://', 1)[0], 20)!r}")
        return self.decode(field, value)

    def decode(self, field: str, text: str) -> bytes:
        if len(text) * 3 // 4 > self.max_bytes + 3:
            raise BadRequest(f"{field}: larger than {megabytes(self.max_bytes)}")
        text = "".join(text.split())
        if not text:
            raise BadRequest(f"{field}: must not be empty")
        text += "=" * (-len(text) % 4)
        try:
            if "-" in text or "_" in text:
                data = base64.b64decode(text, altchars=b"-_", validate=True)
            else:
                data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{field}: not an http(s) URL, a data URI or valid base64") from None
        if len(data) > self.max_bytes:
            raise BadRequest(f"{field}: larger than {megabytes(self.max_bytes)}")
        return data

    async def fetch(self, field: str, url: str) -> bytes:
        """GET `url` through the guard, following at most MAX_REDIRECTS redirects, each checked again."""
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    status, location, body = await self._get(field, url)
                    if status in _REDIRECTS and location:
                        url = urljoin(url, location)
                        continue
                    if not 200 <= status < 300:
                        raise BadRequest(f"{field}: the URL answered {status}")
                    return body
                raise BadRequest(f"{field}: the URL redirected more than {MAX_REDIRECTS} times")
        except TimeoutError:
            raise BadRequest(f"{field}: the URL did not answer within {self.timeout:g}s") from None

    async def _get(self, field: str, url: str) -> tuple[int, str | None, bytes]:
        try:
            _, host, _ = split_url(url)
        except Blocked as exc:
            raise BadRequest(f"{field}: {exc}") from None
        try:
            await check_webhook_url(url, self.policy, self.resolve)
        except Blocked as exc:
            raise refused(field, host, exc) from None
        try:
            async with self._connections().stream(
                    "GET", url, headers={"User-Agent": "kolors-api", "Accept": "image/png,image/jpeg,image/webp"},
                    extensions={"timeout": {"connect": self.timeout, "read": self.timeout}}) as response:
                if response.status in _REDIRECTS:
                    location = next((v.decode("latin-1") for k, v in response.headers if k.lower() == b"location"),
                                    None)
                    return response.status, location, b""
                if not 200 <= response.status < 300:
                    return response.status, None, b""
                length = next((v for k, v in response.headers if k.lower() == b"content-length"), b"")
                if length.isdigit() and int(length) > self.max_bytes:
                    raise BadRequest(f"{field}: the URL's body is larger than {megabytes(self.max_bytes)}")
                body = bytearray()
                async for chunk in response.aiter_stream():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise BadRequest(f"{field}: the URL's body is larger than {megabytes(self.max_bytes)}")
                return response.status, None, bytes(body)
        except Blocked as exc:
            raise refused(field, host, exc) from None
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException, OSError) as exc:
            raise BadRequest(f"{field}: could not fetch the URL ({type(exc).__name__})") from None
