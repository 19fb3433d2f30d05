"""Where output images live: the `Blobs` interface, its file implementation, and `make_blobs`.

`--blob-url` names the place (`kolors_api.jobs.make_blobs`): `file:///dir` (`BlobDir`, below;
`--blob-dir DIR` is its alias) or `s3://bucket/prefix` (`kolors_api.jobs.blobs_s3.S3Blobs`).
Without one, SQLite keeps images as files under its data dir and Redis keeps them in Redis.

Every implementation follows one protocol, fenced by the store's lease-checked commit: a worker
writes a delivery's images under its lease token (`write_pending`), makes the commit (which
records the token with the job), then `commit`s them or, when its lease was stale, `discard`s
them. A reader passes the token the job records. Nothing is readable through the API before the
commit (only COMPLETED jobs are read); `remove` takes everything of a job (leftovers of killed
workers included) at expiry.

Files:

    <root>/<job id>/<i>.<ext>           the outputs of the job, once its completion committed
    <root>/<job id>/.<token>/<i>.<ext>  one delivery's outputs, written before its commit
    <root>/<job id>/inputs/<sha256>     the job's input pictures (`write_input`, at submit)

A worker writes its images under its lease token (`write_pending`), then makes the lease-checked
commit in the store; when that succeeds it moves them into place (`commit`), when the lease was
stale it removes them (`discard`). Several workers of one job therefore never write the same file.
A reader that knows the token (the store records it with the job) looks in the pending folder first,
so images stay readable between the commit and the move, and after a worker died in between.
Removing `<root>/<job id>` (`remove`, at expiry) takes everything of a job, leftovers included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Protocol

from kolors_api.jobs.base import Job


class BlobStoreError(Exception):
    """The blob store named by `--blob-url` cannot be used (start-up check); the message is one line."""


class Blobs(Protocol):
    """A place for output images. Synchronous: the stores call it in threads."""

    #: The `--blob-url` it was made from (for the start-up log).
    url: str

    def check(self) -> None:
        """Raise `BlobStoreError` (one line) when the place cannot be written: run once at start."""
        ...

    def write_pending(self, job_id: str, token: str, images: list[bytes], ext: str) -> None: ...

    def commit(self, job_id: str, token: str) -> None:
        """After the store's commit succeeded: make the delivery's images final."""
        ...

    def discard(self, job_id: str, token: str) -> None:
        """After the store's commit found the lease stale: remove the delivery's images."""
        ...

    def read(self, job_id: str, token: str | None, index: int, ext: str) -> bytes | None: ...

    def remove(self, job_id: str) -> None:
        """Remove every image of a job (at expiry), leftovers of other deliveries and inputs included."""
        ...

    def write_input(self, job_id: str, name: str, data: bytes) -> None:
        """Keep an input picture of a job (`name`: its sha256) until the job goes (`remove`)."""
        ...

    def read_input(self, job_id: str, name: str) -> bytes | None: ...

    def presign(self, job_id: str, token: str | None, index: int, ext: str, seconds: int) -> str | None:
        """A URL a client can GET for `seconds`, or None where there is none (files)."""
        ...

    def sweep(self, retention: float) -> int:
        """Delete leftovers no job names any more (an expiry that ran while the place was out);
        how many. Cheap to call often: it does the work at most every few minutes."""
        ...


def remove_expired(blobs: Blobs, job_ids: list[str], retention: float) -> None:
    """`expire()`'s part for the images: every image of the expired jobs, then the leftovers."""
    for job_id in job_ids:
        blobs.remove(job_id)
    blobs.sweep(retention)


def seconds_left(job: Job) -> int:
    """How long a presigned URL of a job's output may live: until the job expires (at least 1 s)."""
    return max(1, int(job.expires_at - time.time()))


class BlobDir:
    """Images as files under `root` (SQLite's `outputs/`, or a folder every replica mounts)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()

    def check(self) -> None:
        probe = self.root / f".check-{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BlobStoreError(f"blob dir {self.root}: cannot write there: {exc.strerror or exc}") from None

    def presign(self, job_id: str, token: str | None, index: int, ext: str, seconds: int) -> str | None:
        return None

    def sweep(self, retention: float) -> int:
        return 0  # a job's folder goes with the job (`remove`), leftovers included

    def _pending(self, job_id: str, token: str) -> Path:
        return self.root / job_id / f".{token}"

    def write_pending(self, job_id: str, token: str, images: list[bytes], ext: str) -> None:
        pending = self._pending(job_id, token)
        pending.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(images):
            (pending / f"{i}.{ext}").write_bytes(data)

    def commit(self, job_id: str, token: str) -> None:
        """Move a delivery's images into place; call only after its commit succeeded."""
        pending = self._pending(job_id, token)
        with contextlib.suppress(FileNotFoundError):
            for path in list(pending.iterdir()):
                os.replace(path, self.root / job_id / path.name)  # each file atomically
            pending.rmdir()

    def discard(self, job_id: str, token: str) -> None:
        """Remove a delivery's images; its commit found the lease stale."""
        shutil.rmtree(self._pending(job_id, token), ignore_errors=True)

    def read(self, job_id: str, token: str | None, index: int, ext: str) -> bytes | None:
        name = f"{index}.{ext}"
        folder = self.root / job_id
        # pending before final: a file moves from the one to the other atomically, so one of the two
        # opens; `<token>/` is where the Redis store kept images before this layout
        paths = [folder / f".{token}" / name, folder / name, folder / token / name] if token else [folder / name]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                return path.read_bytes()
        return None

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def write_input(self, job_id: str, name: str, data: bytes) -> None:
        folder = self.root / job_id / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / f".{name}.{uuid.uuid4().hex}"
        part.write_bytes(data)
        os.replace(part, folder / name)  # a reader never sees half a file

    def read_input(self, job_id: str, name: str) -> bytes | None:
        with contextlib.suppress(FileNotFoundError):
            return (self.root / job_id / "inputs" / name).read_bytes()
        return None

    def names(self, job_id: str) -> list[str]:
        """The files of a job, relative to `<root>/<job id>/` (tests, tools)."""
        folder = self.root / job_id
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
