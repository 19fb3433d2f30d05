"""API keys: `x-api-key: KEY` (segmind SDK) or `Authorization: Bearer KEY` (OpenAI clients).

Keys are stored only as SHA-256 hashes; the looked-up hash is compared in constant time.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from kolors_api.errors import Forbidden, Unauthorized
from kolors_api.jobs import ApiKey, JobStore, hash_key


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def authenticate(store: JobStore, request: Request, *, admin: bool = False) -> ApiKey:
    key = presented_key(request)
    if key is None:
        if request.headers.get("authorization", "").strip():
            # a key without its scheme (`Authorization: KEY`), or another scheme (Basic)
            raise Unauthorized("the Authorization header must be `Bearer KEY`: send the API key as "
                               "`Authorization: Bearer KEY` or `x-api-key: KEY`")
        raise Unauthorized("missing API key: send x-api-key or Authorization: Bearer")
    digest = hash_key(key)
    record = await store.key_by_hash(digest)
    if record is None or not hmac.compare_digest(record.key_hash, digest):
        raise Unauthorized("invalid API key")
    if not record.enabled:
        raise Forbidden("API key is disabled")
    if admin and not record.admin:
        raise Forbidden("this route needs an admin key")
    return record
