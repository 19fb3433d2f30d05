"""Output images on S3-compatible object storage (AWS S3, MinIO, Cloudflare R2, Ceph, GCS's S3 API).

`--blob-url s3://bucket/prefix`. Credentials, region and endpoint come from the standard AWS
settings, read by boto3 (the `s3` extra): `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` (MinIO, R2),
a profile or an instance role.

Layout, one object per image::

    <prefix>/<job id>/<lease token>/<i>.<ext>
    <prefix>/<job id>/inputs/<sha256>        an input picture (written by the API at submit)

A worker uploads a delivery's images under its lease token before the store's lease-fenced
commit, which records that token with the job; readers (the API, presigned URLs) only ever use
the token a COMPLETED job records, so an image is visible only once its commit is made, and never
moved. A delivery whose commit finds the lease stale deletes its objects; a worker killed between
upload and commit leaves them under the job, and `remove` (at the job's expiry) deletes
everything under `<prefix>/<job id>/`; `sweep` deletes what an expiry during an S3 outage left
(objects of this layout older than the retention plus an hour). A bucket lifecycle rule
(deploy/README.md) is the backstop.

Calls are boto3's, synchronous (the stores run them in threads), with short timeouts and few
retries. An outage (endpoint unreachable, 5xx, throttling, credentials refused) is logged here,
once, and raised as `BlobUnavailable`: the API answers 503 with Retry-After, and a worker whose
upload fails does not commit, so its job is delivered again when the lease runs out.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError

from kolors_api.jobs.blobs import BlobStoreError
from kolors_api.jobs.outage import BlobUnavailable, Outage, describe

log = logging.getLogger(__name__)

#: Media types of the output formats (objects carry them, so presigned GETs answer with them).
CONTENT_TYPES = {"webp": "image/webp", "jpg": "image/jpeg", "png": "image/png"}
#: ClientError codes that mean "not now" rather than "wrong request".
_DOWN_CODES = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "NoSuchBucket",
               "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
               "RequestTimeTooSkewed", "Throttling", "ThrottlingException"}
#: The keys of our layout under the prefix: `<job id>/<lease token>/<i>.<ext>` (ids and tokens are hex).
_LAYOUT = re.compile(r"[0-9a-f]{32}/[0-9a-f]{32}/\d{1,3}\.(?:webp|jpg|png)")
#: A presigned URL is valid at most this long (SigV4's limit, 7 days).
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def is_down(exc: BaseException) -> bool:
    """True for an S3 error that says the store cannot serve now (not a bug of ours)."""
    if isinstance(exc, ParamValidationError):
        return False
    if isinstance(exc, BotoCoreError):  # connect / read timeouts, refused connections, no credentials
        return True
    if isinstance(exc, ClientError):
        status = _status(exc)
        return status >= 500 or status in (403, 429) or _code(exc) in _DOWN_CODES
    return False


class S3Blobs:
    """Images in a bucket, under an optional prefix (see the module docstring)."""

    def __init__(self, url: str, *, uploads: int = 8) -> None:
        parts = urlsplit(url)
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        session = boto3.session.Session()
        # SigV4 everywhere (presigned URLs too: R2 and recent MinIO take nothing else)
        self.client: Any = session.client("s3", config=Config(
            signature_version="s3v4", connect_timeout=3, read_timeout=20,
            retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=max(10, uploads * 2)))
        # the start-up check: fail fast (one try, short timeouts), not after minutes of retries
        self._check_client: Any = session.client("s3", config=Config(
            signature_version="s3v4", connect_timeout=2, read_timeout=3,
            retries={"max_attempts": 1, "mode": "standard"}))
        self._uploads = ThreadPoolExecutor(max_workers=uploads, thread_name_prefix="kolors-s3")
        #: When `sweep` last listed the bucket (monotonic), how often it may, and how much older than
        #: the retention an object must be (uploads precede their commit by seconds; clocks differ).
        self._swept: float | None = None
        self.sweep_every = 600.0
        self.sweep_margin = 3600.0
        self.outage = Outage(log, f"blob store {url}", blob_store=True,
                             meanwhile="output reads answer 503 and jobs whose upload fails are delivered again")

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _image_key(self, job_id: str, token: str, index: int, ext: str) -> str:
        return self._key(job_id, token, f"{index}.{ext}")

    @contextlib.contextmanager
    def _calls(self) -> Iterator[None]:
        """Note successes and outages; an outage leaves as `BlobUnavailable`."""
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            if not is_down(exc):
                raise
            self.outage.failed(exc)
            raise BlobUnavailable(f"blob store {self.url}: {describe(exc)}") from exc
        self.outage.ok()

    def check(self) -> None:
        probe = self._key(".kolors-api-check")
        try:
            self._check_client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            self._check_client.delete_object(Bucket=self.bucket, Key=probe)
        except NoCredentialsError:
            raise BlobStoreError(f"blob store {self.url}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                                 f"AWS_SECRET_ACCESS_KEY, a profile or a role)") from None
        except ClientError as exc:
            code = _code(exc)
            why = {"NoSuchBucket": f"bucket {self.bucket!r} does not exist",
                   "InvalidAccessKeyId": "the access key is unknown (AWS_ACCESS_KEY_ID)",
                   "SignatureDoesNotMatch": "the secret key does not match (AWS_SECRET_ACCESS_KEY)",
                   "AccessDenied": "access denied: the credentials may not write there"}.get(
                       code, f"{code or _status(exc)}: {describe(exc)}")
            raise BlobStoreError(f"blob store {self.url} (endpoint {self.client.meta.endpoint_url}): "
                                 f"{why}") from None
        except BotoCoreError as exc:
            raise BlobStoreError(f"blob store {self.url}: {describe(exc)}") from None

    def write_pending(self, job_id: str, token: str, images: list[bytes], ext: str) -> None:
        def put(item: tuple[int, bytes]) -> None:
            index, data = item
            self.client.put_object(Bucket=self.bucket, Key=self._image_key(job_id, token, index, ext), Body=data,
                                   ContentType=CONTENT_TYPES.get(ext, "application/octet-stream"))

        with self._calls():
            list(self._uploads.map(put, enumerate(images)))  # in parallel; the first error is raised

    def commit(self, job_id: str, token: str) -> None:
        """Nothing to move: the store's commit recorded the token, which is what readers use."""

    def discard(self, job_id: str, token: str) -> None:
        # the outcome is settled already: objects an outage leaves behind go with the job's expiry
        with contextlib.suppress(BlobUnavailable):
            self._delete_under(self._key(job_id, token) + "/")

    def read(self, job_id: str, token: str | None, index: int, ext: str) -> bytes | None:
        if token is None:
            return None
        return self._get(self._image_key(job_id, token, index, ext))

    def _get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such key (a missing bucket still raises)."""
        with self._calls():
            try:
                got = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404") or _status(exc) == 404 and _code(exc) != "NoSuchBucket":
                    return None
                raise
            data: bytes = got["Body"].read()
            return data

    def remove(self, job_id: str) -> None:
        self._delete_under(self._key(job_id) + "/")

    def write_input(self, job_id: str, name: str, data: bytes) -> None:
        with self._calls():
            self.client.put_object(Bucket=self.bucket, Key=self._key(job_id, "inputs", name), Body=data,
                                   ContentType="application/octet-stream")

    def read_input(self, job_id: str, name: str) -> bytes | None:
        return self._get(self._key(job_id, "inputs", name))

    def presign(self, job_id: str, token: str | None, index: int, ext: str, seconds: int) -> str | None:
        if token is None:
            return None
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._image_key(job_id, token, index, ext)},
            ExpiresIn=max(1, min(int(seconds), MAX_PRESIGN_SECONDS)))
        return url

    def sweep(self, retention: float) -> int:
        """Delete objects of our layout older than the retention plus a margin (an image is uploaded
        just before its job completes, so no job still names them): what an expiry during an S3
        outage left. At most every `sweep_every` seconds; other keys under the prefix are left alone."""
        now = time.monotonic()
        if self._swept is not None and now - self._swept < self.sweep_every:
            return 0
        self._swept = now
        start = self._key() + "/" if self.prefix else ""
        cutoff = datetime.now(UTC) - timedelta(seconds=retention + self.sweep_margin)
        old: list[str] = []
        with self._calls():
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                old += [item["Key"] for item in page.get("Contents", [])
                        if item["LastModified"] < cutoff and _LAYOUT.fullmatch(item["Key"][len(start):])]
        self._delete(old)
        if old:
            log.info("blob store %s: swept %d objects older than the retention", self.url, len(old))
        return len(old)

    def names(self, job_id: str) -> list[str]:
        """The object keys of a job, relative to `<prefix>/<job id>/` (tests, tools)."""
        start = self._key(job_id) + "/"
        return sorted(key[len(start):] for key in self._keys_under(start))

    def _keys_under(self, start: str) -> list[str]:
        keys: list[str] = []
        with self._calls():
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def _delete_under(self, start: str) -> None:
        self._delete(self._keys_under(start))

    def _delete(self, keys: list[str]) -> None:
        with self._calls():
            for i in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in keys[i:i + 1000]], "Quiet": True})
