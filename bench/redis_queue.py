"""What the Redis fleet's queue costs: Redis commands per job, and claim latency against the backlog.

Two measurements, each on a private `redis-server` started here on a free port:

1. **Commands per job.** A fleet (`kolors-api serve --no-worker` and two `kolors-api worker`
   processes on the torch-free engine `tests.pixel_engines:pixels`) runs `--jobs` jobs of 4 steps
   at 512² from two API keys, submitted at once (`POST /v2/kolors`). Every command Redis executed
   (INFO commandstats, so the commands run inside Lua scripts count too) from just before the
   first submit until `--idle` seconds after the last job ended (the idle workers' cost counts),
   divided by the jobs. The bench watches the jobs with HGET on its own connection; those commands
   are subtracted.
2. **Claim latency.** With 10, 1,000 and 100,000 jobs queued (two keys), how long one
   `RedisStore.claim` takes (the median and p99 of `--claims` claims, each job completed at once).
   It must not grow with the backlog.

    .venv/bin/python bench/redis_queue.py                 # both
    .venv/bin/python bench/redis_queue.py --skip-depths   # commands per job only

Prints a table and writes JSON to bench/results/redis_queue.json (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "kol_bench_admin_key_redis_queue_0123456789"
JOB = {"steps": 4, "width": 512, "height": 512, "output_format": "png"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server (no persistence) on a free port: its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), "--logfile", "", "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis.from_url(url).ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def kolors(args: list[str], workdir: Path, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": ADMIN, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    workdir.mkdir(parents=True, exist_ok=True)
    log = (workdir / f"{name}.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "kolors_api.cli", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)


def commandstats(r: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in r.info("commandstats").items()}


class Monitor:
    """Counts the commands Redis runs, told apart: sent by a client (a round trip's worth) or run
    inside a Lua script (MONITOR marks those `lua`)."""

    def __init__(self, url: str) -> None:
        self.counts = {"client": 0, "lua": 0}
        self.on = False
        self._conn = redis.Redis.from_url(url)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            with self._conn.monitor() as m:
                for cmd in m.listen():
                    if self.on:
                        self.counts["lua" if cmd.get("client_type") == "lua" else "client"] += 1
        except redis.ConnectionError:
            return  # the server went away at the end of the bench


def fleet_commands(url: str, workdir: Path, jobs: int, idle: float) -> dict[str, Any]:
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    procs = [kolors(["serve", "--no-worker", "--port", str(port), "--store", url, "--model", "tiny",
                     "--data-dir", str(workdir / "api")], workdir, "api")]
    for n in range(2):
        procs.append(kolors(["worker", "--store", url, "--model", "tiny", "--engine", "tests.pixel_engines:pixels",
                             "--data-dir", str(workdir / f"worker{n}")], workdir, f"worker{n}"))
    r = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                text = httpx.get(api_url + "/metrics", timeout=5).text
                line = next((x for x in text.splitlines() if x.startswith("kolors_workers_alive ")), "x 0")
                if float(line.split()[1]) >= 2:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the fleet did not come up; see {workdir}")
            time.sleep(0.2)
        admin = {"x-api-key": ADMIN}
        keys = [httpx.post(api_url + "/v1/admin/keys", json={"name": f"k{i}"}, headers=admin).json()["key"]
                for i in range(2)]
        time.sleep(1.0)  # the fleet settles (start-up work is not the jobs' cost)
        monitor = Monitor(url)
        time.sleep(0.2)
        r.config_resetstat()
        monitor.on = True
        started = time.monotonic()
        ids: list[str] = [""] * jobs

        def submit(i: int) -> None:
            answer = httpx.post(api_url + "/v2/kolors", headers={"x-api-key": keys[i % 2]},
                                json={"prompt": f"job {i}", "seed": i, **JOB}, timeout=60)
            assert answer.status_code in (200, 202), answer.text
            ids[i] = answer.json()["request_id"]

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        own = 0  # the bench's own commands (HGET state), subtracted
        left = set(ids)
        prefix = "kolors:job:"
        while left:
            time.sleep(0.2)
            with r.pipeline(transaction=False) as pipe:
                order = sorted(left)
                for job_id in order:
                    pipe.hget(prefix + job_id, "state")
                states = pipe.execute()
            own += len(order)
            failed = [s for s in states if s == b"FAILED"]
            assert not failed, f"{len(failed)} jobs failed; see {workdir}"
            left = {job_id for job_id, s in zip(order, states, strict=True) if s != b"COMPLETED"}
            if time.monotonic() - started > 300:
                raise SystemExit(f"jobs not done in 300 s; see {workdir}")
        ran = time.monotonic() - started
        time.sleep(idle)
        stats = commandstats(r)
        monitor.on = False
        sent = monitor.counts["client"] - own - 1  # without the bench's HGETs and INFO
        stats["hget"] = stats.get("hget", 0) - own
        stats.pop("config|resetstat", None)
        stats.pop("info", None)
        total = sum(stats.values())
        top = dict(sorted(stats.items(), key=lambda kv: -kv[1]))
        return {"jobs": jobs, "run_s": round(ran, 2), "idle_s": idle, "commands": total,
                "commands_per_job": round(total / jobs, 1),
                "sent_per_job": round(sent / jobs, 1), "in_scripts_per_job": round(monitor.counts["lua"] / jobs, 1),
                "top": top}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def claim_latency(url: str, depths: list[int], claims: int) -> list[dict[str, Any]]:
    from kolors_api.jobs import NewJob, make_key_record, new_key
    from kolors_api.jobs.redis import RedisStore

    out = []
    for depth in depths:
        store = RedisStore(url, prefix=f"bench{depth}:")
        await store.open()
        keys = [make_key_record(f"k{i}", new_key()) for i in range(2)]
        for key in keys:
            await store.add_key(key)
        params = {"prompt": "x", **JOB}
        total = depth + claims
        for start in range(0, total, 32):
            await asyncio.gather(*(store.submit(NewJob(model="kolors", params=params, key_id=keys[i % 2].id))
                                   for i in range(start, min(total, start + 32))))
        times = []
        for _ in range(claims):
            t0 = time.perf_counter()
            lease = await store.claim("bench", 30, 0.1)
            times.append(time.perf_counter() - t0)
            assert lease is not None
            await store.complete(lease, [b"x"], "png", [1], {})
        await store.close()
        times.sort()
        out.append({"depth": depth, "claim_p50_ms": round(statistics.median(times) * 1000, 3),
                    "claim_p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of idle fleet counted after the last job")
    ap.add_argument("--claims", type=int, default=200)
    ap.add_argument("--depths", default="10,1000,100000")
    ap.add_argument("--skip-depths", action="store_true")
    ap.add_argument("--skip-fleet", action="store_true")
    ap.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before, after)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "redis_queue.json")
    args = ap.parse_args()
    result: dict[str, Any] = {"label": args.label}
    with tempfile.TemporaryDirectory(prefix="kolors-bench-redis-") as tmp:
        with redis_server(Path(tmp)) as url:
            if not args.skip_fleet:
                result["fleet"] = fleet_commands(url, Path(tmp) / "fleet", args.jobs, args.idle)
                f = result["fleet"]
                print(f"fleet: {f['jobs']} jobs in {f['run_s']} s + {f['idle_s']} s idle: "
                      f"{f['commands']} Redis commands, {f['commands_per_job']} per job "
                      f"({f['sent_per_job']} sent by clients, {f['in_scripts_per_job']} inside scripts)")
                print(f"  {'command':<16} {'calls':>7} {'per job':>8}")
                for name, calls in f["top"].items():
                    print(f"  {name:<16} {calls:>7} {calls / f['jobs']:>8.2f}")
            if not args.skip_depths:
                depths = [int(d) for d in args.depths.split(",")]
                result["claims"] = asyncio.run(claim_latency(url, depths, args.claims))
                print(f"{'queued':>8} {'claim p50 ms':>13} {'claim p99 ms':>13}")
                for row in result["claims"]:
                    print(f"{row['depth']:>8} {row['claim_p50_ms']:>13} {row['claim_p99_ms']:>13}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
