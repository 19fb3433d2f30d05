"""Async submit throughput and latency of the API for the SQLite and the Redis store.

Starts `kolors-api serve --no-worker` for each store (so jobs stay queued and only the API and the
store are measured), fires v2 submits from C concurrent clients, prints one table and writes JSON;
`cpu ms/req` is the API process's CPU time per submit. `--profile DIR` samples the API process with
py-spy during the wrk run (DIR/<store>.txt, py-spy's raw format) and prints where its time went.
The load comes from `wrk` (Debian's package) when it is installed — a Python client saturates
before the server does — else from an httpx client firing N requests.

    .venv/bin/python bench/serving.py --concurrency 32 --seconds 10     # wrk
    .venv/bin/python bench/serving.py --load httpx --requests 2000 --concurrency 32
    .venv/bin/python bench/serving.py --profile bench/results/profile      # pip install py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY = "kol_bench_admin_key_0123456789abcdef"
BODY = {"prompt": "a lighthouse at dusk", "steps": 25, "width": 1024, "height": 1024}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(store: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    env = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": KEY, "KOLORS_API_LOG_LEVEL": "warning"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kolors_api.cli", "serve", "--port", str(port), "--no-worker",
                             "--store", store, "--data-dir", str(data_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.02)


def proc_stat(pid: int) -> tuple[int, float]:
    """A process's parent pid and CPU seconds so far (user + system), from /proc (after "(comm)":
    state ppid pgrp ... utime (12th) stime (13th))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The process's CPU seconds so far: the server's cost per submit, which holds on a machine where
    the load generator shares the cores."""
    return proc_stat(pid)[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def fire(url: str, n: int, concurrency: int) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"x-api-key": KEY}, limits=limits, timeout=30) as client:
        async def one() -> None:
            nonlocal errors
            while not queue.empty():
                queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post("/v2/kolors", json=BODY)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        for _ in range(20):  # warm-up
            await client.post("/v2/kolors", json=BODY)
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        return latencies, time.perf_counter() - t0, errors


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "%s"
"""


def wrk(url: str, seconds: int, concurrency: int) -> dict[str, float]:
    """`wrk` POSTing BODY to /v2/kolors: requests/s, latency percentiles (ms) and non-2xx answers."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (json.dumps(BODY), KEY))
    threads = max(1, min(concurrency, (os.cpu_count() or 2) // 2))
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s",
                          script.name, url + "/v2/kolors"], capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def latency(p: str) -> float:
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)$", out, re.M).groups()  # type: ignore[union-attr]
        return round(float(value) * units[unit], 2)

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    # wrk leaves a request it gave up on (2 s) out of the latencies: counted apart, with socket errors
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    most = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out, re.M)
    return {"throughput_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": latency("50"), "p99_ms": latency("99"),
            "max_ms": round(float(most.group(1)) * units[most.group(2)], 2) if most else 0.0,
            "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0),
            "requests": int(total.group(1)) if total else 0}


def profile(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the process for `seconds` (100 Hz, Python frames) into `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "-r", "100", "-f", "raw", "-o", str(out), "--pid", str(pid),
                             "-d", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def hot_spots(raw: Path, top: int = 15) -> list[tuple[str, float, float]]:
    """(function, % of samples inside it, % of samples in its own code) of a py-spy raw profile, by own time."""
    inside: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, total = int(count), total + int(count)
        frames = [re.sub(r" \(.*?(site-packages|src)/", " (", f) for f in stack.split(";")]
        for name in set(frames):
            inside[name] = inside.get(name, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    ranked = sorted(own, key=lambda f: -own[f])[:top]
    return [(f, 100 * inside[f] / max(1, total), 100 * own[f] / max(1, total)) for f in ranked]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--load", choices=("wrk", "httpx"), default="wrk" if shutil.which("wrk") else "httpx")
    ap.add_argument("--seconds", type=int, default=10, help="wrk: seconds of load")
    ap.add_argument("--requests", type=int, default=1000, help="httpx: requests to fire")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--out", default="bench/results/serving.json")
    ap.add_argument("--profile", type=Path, help="a folder: py-spy the API process during the wrk run")
    args = ap.parse_args()
    rows = []
    for name, store in (("sqlite", "sqlite"), ("redis", args.redis)):
        if name == "redis":
            import redis

            redis.Redis.from_url(args.redis).flushdb()
        data_dir = Path(tempfile.mkdtemp(prefix="kolors-bench-"))
        proc, url, startup = start(store, data_dir)
        try:
            row: dict[str, object] = {"store": name, "load": args.load, "concurrency": args.concurrency}
            if args.load == "wrk":
                wrk(url, 2, 4)  # warm-up
            cpu = cpu_seconds(proc.pid)
            spy = profile(proc.pid, args.seconds, args.profile / f"{name}.txt") if args.profile else None
            if args.load == "wrk":
                row |= wrk(url, args.seconds, args.concurrency)
            else:
                lat, wall, errors = asyncio.run(fire(url, args.requests, args.concurrency))
                row |= {"requests": args.requests, "throughput_rps": round(args.requests / wall, 1),
                        "p50_ms": round(pct(lat, 50) * 1000, 2), "p99_ms": round(pct(lat, 99) * 1000, 2),
                        "mean_ms": round(statistics.mean(lat) * 1000, 2), "errors": errors}
            used = cpu_seconds(proc.pid) - cpu
            if spy is not None:
                spy.wait()
            row["cpu_ms_per_request"] = round(1000 * used / max(1, int(row["requests"])), 3)  # type: ignore[call-overload]
            rows.append(row | {"startup_s": round(startup, 2), "rss_mb": round(rss_mb(proc.pid), 1)})
        finally:
            proc.terminate()
            proc.wait()
            shutil.rmtree(data_dir, ignore_errors=True)
            if name == "redis":
                redis.Redis.from_url(args.redis).flushdb()
    base = float(rows[0]["throughput_rps"])  # type: ignore[arg-type]
    print(f"{'store':8} {'req':>6} {'conc':>5} {'rps':>8} {'x sqlite':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'err':>4} {'start s':>8} {'rss MB':>7} {'cpu ms/req':>10}")
    for r in rows:
        print(f"{r['store']:8} {r['requests']:>6} {r['concurrency']:>5} {r['throughput_rps']:>8} "
              f"{float(r['throughput_rps']) / base:>9.2f} {r['p50_ms']:>8} {r['p99_ms']:>8} "
              f"{r.get('max_ms', '-'):>8} {r['errors']:>4} "
              f"{r['startup_s']:>8} {r['rss_mb']:>7} {r['cpu_ms_per_request']:>10}")
    for r in rows if args.profile else ():
        raw = args.profile / f"{r['store']}.txt"
        if raw.exists():
            print(f"\n{r['store']}: where the API process's samples were (inside %, own %), by own time")
            for name, inside, own in hot_spots(raw):
                print(f"{inside:6.1f} {own:6.1f}  {name[:110]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
