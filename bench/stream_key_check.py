"""What an open event stream costs to keep its key honest: the re-check `Grant.holds` makes every
`KEY_CHECK_SECONDS` (0.5 s) per open stream (`get_key` + `current_webhook_secret`, reads only), timed
on SQLite and on Redis, and what that comes to for many open streams.

    .venv/bin/python bench/stream_key_check.py --redis redis://127.0.0.1:6379/9 --checks 2000 --out key_check.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from kolors_api.api.events import KEY_CHECK_SECONDS, Grant
from kolors_api.jobs import Job, JobState, JobStore, make_key_record, new_key
from kolors_api.jobs.redis import RedisStore
from kolors_api.jobs.sqlite import SQLiteStore


async def per_check(store: JobStore, checks: int) -> float:
    await store.open()
    try:
        record = make_key_record("bench", new_key())
        await store.add_key(record)
        grant = Grant(record, await store.webhook_secret(record.id))
        job = Job(id="j", model="kolors", params={}, state=JobState.PROCESSING, created_at=time.time(),
                  key_id=record.id)
        assert await grant.holds(store, job)
        started = time.perf_counter()
        for _ in range(checks):
            await grant.holds(store, job)
        return (time.perf_counter() - started) / checks
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9", help="a Redis db it may write a key to")
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[str, JobStore] = {"sqlite": SQLiteStore(Path(tmp) / "db.sqlite3"), "redis": RedisStore(args.redis)}
        rows = {name: asyncio.run(per_check(store, args.checks)) for name, store in stores.items()}
    # one check is two reads; "busy" is the checks' wall time per second if run one after another
    print(f"{'store':8} {'per check (ms)':>15} {'reads/s, 1000 streams':>22} {'busy s/s, 1000 streams':>23}")
    for name, seconds in rows.items():
        per_second = 1000 / KEY_CHECK_SECONDS
        print(f"{name:8} {seconds * 1e3:15.3f} {per_second * 2:22.0f} {seconds * per_second:23.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"key_check_seconds": KEY_CHECK_SECONDS, "per_check_seconds": rows}, indent=2))


if __name__ == "__main__":
    main()
