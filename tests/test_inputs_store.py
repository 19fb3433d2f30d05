"""Input pictures in every store backend: kept with the job where any worker reads them, gone with it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kolors_api.jobs import NewJob
from tests.test_store import BACKENDS, drop, make, params

SHA = "a" * 64


@pytest.mark.parametrize("backend", BACKENDS)
async def test_inputs_are_read_by_the_worker_and_expire_with_the_job(tmp_path: Path, backend: str,
                                                                    request: pytest.FixtureRequest) -> None:
    if backend.endswith("-s3"):
        request.getfixturevalue("moto_s3")
    store = await make(backend, tmp_path, retention=0.5)
    try:
        new = NewJob(model="kolors-img2img", params={**params(), "image": SHA, "strength": 0.5})
        await store.write_inputs(new.id, {SHA: b"picture bytes"})
        job = await store.submit(new)
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None and lease.job.id == job.id and lease.job.params["image"] == SHA
        assert await store.read_input(job.id, SHA) == b"picture bytes"
        assert await store.read_input(job.id, "b" * 64) is None
        assert await store.complete(lease, [b"x"], "png", [1], {})
        assert await store.read_input(job.id, SHA) == b"picture bytes"  # kept while the result is
        await asyncio.sleep(0.7)
        assert await store.expire() == 1
        assert await store.read_input(job.id, SHA) is None
    finally:
        await drop(store)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_remove_inputs_drops_them_at_once(tmp_path: Path, backend: str) -> None:
    store = await make(backend, tmp_path)
    try:
        await store.write_inputs("f" * 32, {SHA: b"picture bytes"})
        await store.remove_inputs("f" * 32)
        assert await store.read_input("f" * 32, SHA) is None
    finally:
        await drop(store)
