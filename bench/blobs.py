"""What storing and fetching one output image costs, by where images live: in Redis, in a blob dir
(files), or on S3 — through the real job stores (`complete` with one image, then `read_output`).

Two payloads: ~150 KB (a 1024² webp) and ~1.5 MB (a 1024² PNG), random bytes. "store" is the
worker's `complete` (upload + lease-fenced commit), "fetch" the API's `read_output`. Medians and
p90 over `--rounds` jobs per case.

S3 is moto's server on loopback unless `--s3-url` names a real bucket (credentials and endpoint
from the AWS_* env): moto is a Python server in this process, so its numbers are the client's
path plus a slow server, not what S3 or MinIO answer in (expect ~10-50 ms a request in-region).

    .venv/bin/python bench/blobs.py                           # Redis at 127.0.0.1:6379, moto
    .venv/bin/python bench/blobs.py --redis redis://10.0.0.5:6379/0 --s3-url s3://bucket/bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kolors_api.jobs import JobStore, NewJob, make_blobs
from kolors_api.jobs.blobs import Blobs

PAYLOADS = {"webp ~150 KB": 150 * 1024, "png ~1.5 MB": 1536 * 1024}
PARAMS = {"prompt": "bench", "steps": 25, "width": 1024, "height": 1024, "number_of_images": 1}


def start_moto() -> tuple[Any, str]:
    """moto's S3 server on a free loopback port, with fake credentials in the env; (server, bucket url)."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    bucket = f"kolors-bench-{uuid.uuid4().hex[:8]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    return server, f"s3://{bucket}/bench"


def make_store(kind: str, redis_url: str, s3_url: str, tmp: Path) -> JobStore:
    backend, _, place = kind.partition("+")
    blobs: Blobs | None = None
    if place == "s3":
        blobs = make_blobs(s3_url)
    elif place == "files":
        blobs = make_blobs((tmp / f"blobs-{uuid.uuid4().hex[:6]}").as_uri())
    if backend == "sqlite":
        from kolors_api.jobs.sqlite import SQLiteStore

        return SQLiteStore(tmp / f"{uuid.uuid4().hex[:6]}.sqlite3", blobs=blobs)
    from kolors_api.jobs.redis import RedisStore

    return RedisStore(redis_url, prefix=f"kolors-bench-{uuid.uuid4().hex[:8]}:", blobs=blobs)


async def measure(store: JobStore, size: int, rounds: int) -> dict[str, float]:
    store_ms: list[float] = []
    fetch_ms: list[float] = []
    for _ in range(rounds + 1):  # the first round warms connections up, and is not counted
        image = secrets.token_bytes(size)
        job = await store.submit(NewJob(model="kolors", params=PARAMS))
        lease = await store.claim("bench", 60, 1)
        assert lease is not None and lease.job.id == job.id
        t0 = time.perf_counter()
        assert await store.complete(lease, [image], "webp", [1], {})
        t1 = time.perf_counter()
        got = await store.read_output(job.id, 0)
        t2 = time.perf_counter()
        assert got == image
        store_ms.append((t1 - t0) * 1000)
        fetch_ms.append((t2 - t1) * 1000)
    store_ms, fetch_ms = store_ms[1:], fetch_ms[1:]

    def p90(xs: list[float]) -> float:
        return sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]

    return {"store_ms": round(statistics.median(store_ms), 2), "store_p90_ms": round(p90(store_ms), 2),
            "fetch_ms": round(statistics.median(fetch_ms), 2), "fetch_p90_ms": round(p90(fetch_ms), 2)}


async def cleanup(store: JobStore) -> None:
    keys = getattr(store, "keys", None)
    if keys is not None:  # Redis: this run's prefix
        redis = await store._conn()
        async for key in redis.scan_iter(match=keys.prefix + "*", count=1000):
            await redis.delete(key)
    await store.close()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            for label, size in PAYLOADS.items():
                store = make_store(kind, args.redis, args.s3_url, Path(tmp))
                await store.open()
                try:
                    rows.append({"where": kind, "payload": label, "bytes": size, **await measure(store, size,
                                                                                              args.rounds)})
                finally:
                    await cleanup(store)
                print(f"{kind:14} {label:13} store {rows[-1]['store_ms']:8.2f} ms (p90 {rows[-1]['store_p90_ms']:8.2f})"
                      f"   fetch {rows[-1]['fetch_ms']:8.2f} ms (p90 {rows[-1]['fetch_p90_ms']:8.2f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default=f"redis://{os.environ.get('KOLORS_API_TEST_REDIS_ADDR', '127.0.0.1:6379')}/0")
    ap.add_argument("--s3-url", default=None, help="a real bucket (default: moto on loopback)")
    ap.add_argument("--kinds", default="redis,redis+files,redis+s3,sqlite+files,sqlite+s3",
                    help="store+where, comma-separated: redis (images in Redis), redis+files, redis+s3, "
                         "sqlite+files, sqlite+s3")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default="bench/results/blobs.json")
    args = ap.parse_args()
    server = None
    if args.s3_url is None:
        server, args.s3_url = start_moto()
    try:
        rows = asyncio.run(run(args))
    finally:
        if server is not None:
            server.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    s3 = "moto on loopback (in-process Python server)" if server is not None else args.s3_url
    out.write_text(json.dumps({"bench": "blobs", "rounds": args.rounds, "s3": s3, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
