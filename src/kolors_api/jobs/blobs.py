"""Output images as files: one layout for both backends (SQLite's `outputs/`, Redis's `blob_dir`).

    <root>/<job id>/<i>.<ext>           the outputs of the job, once its completion committed
    <root>/<job id>/.<token>/<i>.<ext>  one delivery's outputs, written before its commit

A worker writes its images under its lease token (`write_pending`), then makes the lease-checked
commit in the store; when that succeeds it moves them into place (`commit`), when the lease was
stale it removes them (`discard`). Several workers of one job therefore never write the same file.
A reader that knows the token (Redis records it with the job) looks in the pending folder first,
so images stay readable between the commit and the move, and after a worker died in between.
Removing `<root>/<job id>` (`remove`, at expiry) takes everything of a job, leftovers included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


class BlobDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

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
