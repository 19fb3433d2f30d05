"""A lone key's latency while another key floods the queue: first in, first out against fair queuing.

One key submits a flood of jobs at once; shortly after, a second key submits a few jobs, one at a
time. Simulated workers claim from the real store (SQLite, and Redis when `--redis` names one) and
hold each job for `--service` seconds per reference request of work, so only the queue's order
differs between the two runs:

- before (`fifo`): every job in one queue (no keys), the order the store had before fair queuing;
- after (`fair`): the flood under key A and the lone jobs under key B, weights 1 and 1.

    .venv/bin/python bench/fairness.py                                  # SQLite only
    .venv/bin/python bench/fairness.py --redis redis://127.0.0.1:6379/0 # and Redis (own key prefix)

Prints a table and writes JSON to bench/results/fairness.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kolors_api.jobs import JobState, JobStore, NewJob, make_key_record, new_key
from kolors_api.jobs.fair import work

PARAMS = {"prompt": "a fox", "steps": 25, "width": 512, "height": 512, "number_of_images": 1}


async def run(store: JobStore, mode: str, flood: int, lone: int, workers: int, service: float,
              gap: float) -> dict[str, Any]:
    a, b = make_key_record("flood", new_key()), make_key_record("lone", new_key())
    for key in (a, b):
        await store.add_key(key)
    done: dict[str, float] = {}
    stop = asyncio.Event()

    async def worker(name: str) -> None:
        while not stop.is_set():
            lease = await store.claim(name, 30, 0.05)
            if lease is None:
                continue
            await asyncio.sleep(work(lease.job.params) * service)
            assert await store.complete(lease, [b"x"], "png", [1], {})
            done[lease.job.id] = time.perf_counter()

    def owner(key_id: str) -> str | None:
        return key_id if mode == "fair" else None  # fifo: one queue for all

    start = time.perf_counter()
    tasks = [asyncio.create_task(worker(f"w{i}")) for i in range(workers)]
    flood_ids = [(await store.submit(NewJob(model="kolors", params=PARAMS, key_id=owner(a.id)))).id
                 for _ in range(flood)]
    submitted: dict[str, float] = {}
    for _ in range(lone):
        await asyncio.sleep(gap)
        job = await store.submit(NewJob(model="kolors", params=PARAMS, key_id=owner(b.id)))
        submitted[job.id] = time.perf_counter()
    while not all(i in done for i in [*flood_ids, *submitted]):
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*tasks)
    for job_id in submitted:
        got = await store.get(job_id)
        assert got is not None and got.state == JobState.COMPLETED
    latencies = [done[i] - t for i, t in submitted.items()]
    return {"mode": mode, "lone_p50_s": statistics.median(latencies), "lone_max_s": max(latencies),
            "flood_done_s": max(done[i] for i in flood_ids) - start}


async def stores(redis_url: str | None, root: Path) -> list[tuple[str, Any]]:
    from kolors_api.jobs.sqlite import SQLiteStore

    out: list[tuple[str, Any]] = [("sqlite", lambda mode: SQLiteStore(root / f"{mode}.sqlite3"))]
    if redis_url:
        from kolors_api.jobs.redis import RedisStore

        out.append(("redis", lambda mode: RedisStore(redis_url, prefix=f"kolors-bench-{uuid.uuid4().hex[:8]}:")))
    return out


async def drop_prefix(store: Any) -> None:
    """Delete the keys of the bench's own prefix (never anything else)."""
    from redis.asyncio import Redis

    client = Redis.from_url(store.url)
    try:
        found = [key async for key in client.scan_iter(match=store.keys.everything, count=500)]
        for i in range(0, len(found), 500):
            await client.unlink(*found[i:i + 500])
    finally:
        await client.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default=None, help="a Redis URL to run the Redis store too (keys under its own prefix)")
    ap.add_argument("--flood", type=int, default=200, help="jobs the flooding key submits at once")
    ap.add_argument("--lone", type=int, default=5, help="jobs the lone key submits, one every --gap seconds")
    ap.add_argument("--gap", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--service", type=float, default=0.1,
                    help="seconds a worker holds a job per reference request of work (1024², 25 steps)")
    ap.add_argument("--out", default="bench/results/fairness.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory in await stores(args.redis, Path(tmp)):
            for mode in ("fifo", "fair"):
                store = factory(mode)
                await store.open()
                try:
                    row = await run(store, mode, args.flood, args.lone, args.workers, args.service, args.gap)
                finally:
                    if name == "redis":
                        await drop_prefix(store)
                    await store.close()
                rows.append({"store": name, **row})
    print(f"{'store':8} {'order':6} {'lone p50 s':>11} {'lone max s':>11} {'flood done s':>13}")
    for r in rows:
        print(f"{r['store']:8} {r['mode']:6} {r['lone_p50_s']:11.3f} {r['lone_max_s']:11.3f} {r['flood_done_s']:13.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args) | {"redis": bool(args.redis)}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
