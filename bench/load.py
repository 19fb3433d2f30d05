"""Serving under production-like load: open-loop Poisson arrivals, a burst, and a lone request.

Every row of one run uses the same weights and the same arrival schedules (seeded):

- **stock diffusers, one after another**: `KolorsPipeline` in this process, serving a queue in
  arrival order; its latency under load is its queue;
- **LitServe peer** (bench/litserve_peer.py: stock pipeline, `max_batch_size` 8, `batch_timeout` 50 ms);
- **kolors-api** (`kolors-api serve`, its defaults), and **kolors-api, batching off**
  (`--max-batch-images 1`: whether batching pays on this device at each load); with
  `--servers ...,ours-split`, also `serve --no-worker` and a `kolors-api worker` as processes of
  their own on Redis; with
  `ours-base --baseline-src OLD/src`, the `serve` of another checkout (a before/after in one run).

Loads, each client a thread with a connection of its own (as users send them):

- `poisson@F`: arrivals at F × the measured capacity (stock diffusers' images/s, the better of one
  image a call and `--batch` prompts in one call: on a GPU the batch, on CPU often the single image),
  for `--seconds`; an open loop: nobody waits for an answer to send the next;
- `burst`: `--burst` clients released at one instant (requests a few ms apart on the wire);
- `lone`: one request at a time on an idle server (`--lone` of them, idle between), the median.

Per row: requests, throughput (answered / the time from the first arrival to the last answer),
latency p50/p95/p99, queue wait (stock: its queue; kolors-api: the jobs' `queue_time`), mean batch
(kolors-api: engine calls' jobs from /metrics; LitServe: the batch each answer came from). Then, for
kolors-api's rows, where the time went (medians of each job's timeline: queue, batching wait, engine
call, finish; and what the serving path added to it), beside the peer's p50. Per server row, the CPU
seconds its processes spent per answered request (`cpu/req`; `http`: its HTTP process's part), which
holds on a busy machine where wall times do not.

    .venv/bin/python bench/load.py                                   # CPU, tiny model, 512², 20 steps
    .venv/bin/python bench/load.py --servers ours,litserve --fractions 0.8 --seconds 30
    python bench/load.py --model random:full --device cuda --size 1024 --steps 25   # bench/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import body, wait_up  # noqa: E402  (bench/ is not a package)
from serving import KEY, free_port, proc_stat  # noqa: E402


@dataclass
class Answer:
    sent: float  # when it was due (perf_counter)
    done: float
    ok: bool
    queue_wait: float | None = None
    batch: int | None = None
    request_id: str | None = None
    #: The job's own timeline (`metrics` of its record: queue_time, batch_wait, call_time, finish_time,
    #: total_time) and, as `serving`, the rest of the client's latency (HTTP, accept, wake-up, answer).
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class Row:
    server: str
    load: str
    requests: int
    failed: int
    throughput: float  # answered requests per second
    p50: float
    p95: float
    p99: float
    queue_wait_p50: float | None
    mean_batch: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def row(server: str, load: str, answers: list[Answer], mean_batch: float | None = None) -> Row:
    ok = [a for a in answers if a.ok]
    lat = [a.done - a.sent for a in ok]
    span = max(a.done for a in ok) - min(a.sent for a in answers) if ok else float("nan")
    waits = [a.queue_wait for a in ok if a.queue_wait is not None]
    batches = [a.batch for a in ok if a.batch is not None]
    if mean_batch is None and batches:
        mean_batch = statistics.mean(batches)
    out = Row(server, load, len(answers), len(answers) - len(ok), len(ok) / span if ok else 0.0,
              pct(lat, 50), pct(lat, 95), pct(lat, 99), statistics.median(waits) if waits else None, mean_batch)
    staged = [a.stages for a in ok if a.stages]
    if staged:
        out.extra["stages_p50"] = {name: statistics.median(s[name] for s in staged if name in s)
                                   for name in STAGES if any(name in s for s in staged)}
    return out


#: The breakdown printed per row of ours: the job's timeline, then what the serving path added.
STAGES = ("queue_time", "batch_wait", "call_time", "finish_time", "serving")


def poisson(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival offsets (s) of a Poisson process of `rate` per second over `seconds`."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out or [0.0]
        out.append(t)


def open_loop(offsets: list[float], send: Callable[[int], Answer]) -> list[Answer]:
    """Send request i at offsets[i] on a thread of its own, whatever the answers; all answers."""
    answers: list[Answer | None] = [None] * len(offsets)
    threads = []
    start = time.perf_counter() + 0.05

    def one(i: int) -> None:
        answers[i] = send(i)

    for i, offset in enumerate(offsets):
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return [a for a in answers if a is not None]


def burst(n: int, send: Callable[[int], Answer]) -> list[Answer]:
    """`n` clients, each on its own thread and connection, released together."""
    barrier = threading.Barrier(n)
    answers: list[Answer | None] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        answers[i] = send(i)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [a for a in answers if a is not None]


class Stock:
    """Stock diffusers in this process, one request after another, from a queue in arrival order."""

    def __init__(self, pipe: Any, size: int, steps: int, device: str) -> None:
        self.pipe, self.size, self.steps, self.device = pipe, size, steps, device
        self.jobs: queue.Queue[tuple[int, threading.Event, dict[str, Any]]] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def call(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        import torch

        return list(self.pipe(prompt=prompts, guidance_scale=6.0, num_inference_steps=self.steps, width=self.size,
                              height=self.size, generator=[torch.Generator(self.device).manual_seed(s)
                                                           for s in seeds]).images)

    def _serve(self) -> None:
        import io

        while True:
            i, done, out = self.jobs.get()
            out["started"] = time.perf_counter()
            image = self.call([body(i, self.size, self.steps)["prompt"]], [1000 + i])[0]
            image.save(io.BytesIO(), format="WEBP", quality=80)
            done.set()

    def send(self, i: int) -> Answer:
        sent, done, out = time.perf_counter(), threading.Event(), {}
        self.jobs.put((i, done, out))
        done.wait()
        return Answer(sent, time.perf_counter(), True, queue_wait=out["started"] - sent, batch=1)


def http_send(url: str, path: str, payload: Callable[[int], dict[str, Any]]) -> Callable[[int], Answer]:
    def send(i: int) -> Answer:
        sent = time.perf_counter()
        try:
            with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=900) as client:  # its own connection
                r = client.post(path, json=payload(i))
        except httpx.HTTPError:
            return Answer(sent, time.perf_counter(), False)
        done = time.perf_counter()
        if r.status_code != 200:
            return Answer(sent, done, False)
        batch = None
        if r.headers.get("content-type", "").startswith("application/json"):
            batch = r.json().get("batch")
        return Answer(sent, done, True, batch=batch, request_id=r.headers.get("x-request-id"))
    return send


def engine_calls(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    got = {}
    for name in ("kolors_engine_calls_total", "kolors_engine_call_jobs_total"):
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        got[name] = float(m.group(1)) if m else 0.0
    return got["kolors_engine_calls_total"], got["kolors_engine_call_jobs_total"]


def queue_waits(url: str, answers: list[Answer]) -> None:
    with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=30) as client:
        for a in answers:
            if a.request_id:
                r = client.get(f"/v2/requests/{a.request_id}")
                if r.status_code == 200:
                    metrics = r.json()["metrics"]
                    a.queue_wait = metrics["queue_time"]
                    a.stages = {name: float(metrics[name]) for name in STAGES if name in metrics}
                    if "total_time" in metrics:
                        a.stages["serving"] = max(0.0, (a.done - a.sent) - float(metrics["total_time"]))


def start_server(kind: str, model: str, work: Path, device: str | None,
                 redis: str = "redis://127.0.0.1:6379/9") -> tuple[list[subprocess.Popen[bytes]], str]:
    """The server of `kind` (NAMES), each process in a session of its own; the first is the HTTP one."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = ["--model", model, "--data-dir", str(work / kind), *(["--device", device] if device else [])]
    if kind == "litserve":
        cmds = [[sys.executable, str(Path(__file__).with_name("litserve_peer.py")), "--model", model,
                 "--port", str(port)]]
        health = "/health"
    else:
        serve = [sys.executable, "-m", "kolors_api.cli", "serve", "--port", str(port)]
        if kind == "ours-split":  # the API and the worker in processes of their own, on Redis
            import redis as redis_py

            redis_py.Redis.from_url(redis).flushdb()
            cmds = [[*serve, "--store", redis, "--no-worker", "--data-dir", str(work / kind)],
                    [sys.executable, "-m", "kolors_api.cli", "worker", "--store", redis, *engine]]
        else:
            cmds = [[*serve, *engine, *(["--max-batch-images", "1"] if kind == "ours-off" else [])]]
        health = "/readyz"
    env = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": KEY, "KOLORS_API_LOG_LEVEL": "warning"}
    if kind == "ours-base":  # the same serve command on another checkout's code (--baseline-src)
        env["PYTHONPATH"] = BASELINE_SRC[0]
    # its own session: LitServe's inference and API workers are processes of their own, stopped with it
    procs = [subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True) for cmd in cmds]
    wait_up(url, procs[0], health, timeout=1800)
    return procs, url


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of the live process `root` and all its descendants, by pid:
    what a server spends per request, in its HTTP process and the rest (engine processes, LitServe's
    workers), which holds on a machine busy with something else where wall times do not."""
    parent: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parent[int(entry.name)], seconds[int(entry.name)] = proc_stat(int(entry.name))
            except OSError:  # gone meanwhile
                continue

    def under(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parent.get(pid, 0)
        return False

    return {pid: used for pid, used in seconds.items() if under(pid)}


def gone(group: int, timeout: float = 60) -> None:
    """Wait until every process of the group `group` has exited (the next server's rows must not share
    the cores with the last one's children), killing what is left after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(group, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


NAMES = {"stock": "stock diffusers, one after another", "litserve": "LitServe peer (batch 8, 50 ms)",
         "ours": "kolors-api serve", "ours-off": "kolors-api, batching off",
         "ours-split": "kolors-api, API + worker processes", "ours-base": "kolors-api serve, --baseline-src"}
#: The `src` folder of another checkout, for the `ours-base` row (set by --baseline-src).
BASELINE_SRC: list[str] = [""]


def stock_pipeline(model: str, device: str) -> Any:
    import torch

    from kolors_api.settings import random_model_size

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    size = random_model_size(model)
    if size is not None:
        from kolors_api.engine.random_weights import build_random_pipeline

        pipe = build_random_pipeline(size, device=device, dtype=dtype)
    else:
        from diffusers import KolorsPipeline

        pipe = KolorsPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="tiny (default, built here), a diffusers folder, random:small|full")
    ap.add_argument("--device", default=None, help="cpu (default) or cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="the call whose images/s is the capacity")
    ap.add_argument("--fractions", default="0.5,0.8,1.0,1.2")
    ap.add_argument("--seconds", type=float, default=15.0, help="arrivals last this long at each rate")
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--lone", type=int, default=7)
    ap.add_argument("--servers", default="stock,litserve,ours,ours-off",
                    help="of stock, litserve, ours, ours-off (batching off), ours-split (API and worker processes "
                         "on --redis)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9", help="for ours-split (this database is flushed)")
    ap.add_argument("--capacity", type=float, default=None, help="images/s (skip measuring it)")
    ap.add_argument("--baseline-src", default=None,
                    help="the src/ folder of another checkout (e.g. a git worktree of main): the ours-base row "
                         "runs its serve, for a before/after in one run")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="bench/results/load.json")
    args = ap.parse_args()
    device = args.device or "cpu"
    work = Path(tempfile.mkdtemp(prefix="kolors-load-bench-"))
    model = args.model
    if model in (None, "tiny"):
        from kolors_api.engine import build_tiny_model

        model = str(build_tiny_model(work / "tiny"))
    servers = args.servers.split(",")
    if "ours-base" in servers and not args.baseline_src:
        ap.error("ours-base needs --baseline-src")
    BASELINE_SRC[0] = str(Path(args.baseline_src).resolve()) if args.baseline_src else ""
    fractions = [float(f) for f in args.fractions.split(",")]
    size, steps = args.size, args.steps
    rows: list[Row] = []

    def show(r: Row) -> None:
        rows.append(r)
        print(f"  {NAMES[r.server]:36} {r.load:13} n={r.requests:<4} {r.throughput:6.2f} req/s  p50 {r.p50:6.2f}  "
              f"p95 {r.p95:6.2f}  p99 {r.p99:6.2f}  batch {r.mean_batch or 0:4.1f}", flush=True)

    capacity = args.capacity
    stock = None
    if "stock" in servers or capacity is None:
        stock = Stock(stock_pipeline(model, device), size, steps, device)
        stock.call(["warm-up"], [0])
        if capacity is None:
            rates = []
            for n in (1, args.batch):
                walls = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    stock.call([f"capacity {i}" for i in range(n)], list(range(n)))
                    walls.append(time.perf_counter() - t0)
                rates.append(n / min(walls))
            capacity = max(rates)
    print(f"{size}x{size}, {steps} steps, model {args.model or 'tiny'}, {device}; capacity {capacity:.2f} images/s "
          f"(the best of stock diffusers' one image and {args.batch} prompts in one call)", flush=True)
    schedules = {f: poisson(f * capacity, args.seconds, args.seed + n) for n, f in enumerate(fractions)}

    def loads(name: str, send: Callable[[int], Answer], after: Callable[[list[Answer]], float | None],
              root: int | None = None) -> None:
        cpu = [tree_cpu(root) if root else {}]

        def done(load: str, answers: list[Answer]) -> Row:
            """The row of `answers`, with the server's CPU seconds per answered request (its HTTP
            process, the rest), taken before `after` asks the server for the jobs' records."""
            used: dict[int, float] = {}
            if root:
                now = tree_cpu(root)
                used = {pid: now[pid] - cpu[0].get(pid, 0.0) for pid in now}
                cpu[0] = now
            r = row(name, load, answers, after(answers))
            if root:
                answered = max(1, r.requests - r.failed)
                r.extra["cpu_http"] = used.get(root, 0.0) / answered
                r.extra["cpu_rest"] = sum(v for pid, v in used.items() if pid != root) / answered
                cpu[0] = tree_cpu(root)
            return r

        lone = []
        for _ in range(args.lone):
            lone += [send(0)]
            time.sleep(0.5)
        lone_row = done("lone", lone)
        lone_row.extra["lone_median"] = statistics.median(a.done - a.sent for a in lone if a.ok)
        show(lone_row)
        answers = burst(args.burst, send)
        show(done(f"burst {args.burst}", answers))
        for f, offsets in schedules.items():
            answers = open_loop(offsets, send)
            show(done(f"poisson@{f:g}", answers))

    if stock is not None and "stock" in servers:
        loads("stock", stock.send, lambda answers: None)
    stock = None
    for name in servers:
        if name == "stock":
            continue
        procs, url = start_server(name, model, work, args.device, args.redis)
        try:
            if name == "litserve":
                send = http_send(url, "/predict", lambda i: body(i, size, steps))
                http_send(url, "/predict", lambda i: body(i, size, steps))(0)  # warm-up
                loads(name, send, lambda answers: None, procs[0].pid)
            else:
                send = http_send(url, "/v1/kolors", lambda i: body(i, size, steps))
                send(0)  # warm-up
                before = [engine_calls(url)]

                def after(answers: list[Answer], url: str = url, before: list[tuple[float, float]] = before) -> float:
                    queue_waits(url, answers)
                    calls, jobs = engine_calls(url)
                    mean = (jobs - before[0][1]) / max(1.0, calls - before[0][0])
                    before[0] = (calls, jobs)
                    return mean
                loads(name, send, after, procs[0].pid)
        finally:
            for proc in procs:
                os.killpg(proc.pid, signal.SIGTERM)  # the process and its children (LitServe's workers)
                proc.wait(60)
                gone(proc.pid)

    print(f"\n{size}x{size}, {steps} steps, {device}, {os.cpu_count()} cores; capacity {capacity:.2f} img/s; "
          f"poisson for {args.seconds:g}s per rate; latency in seconds")
    print(f"{'server':36} {'load':13} {'req':>4} {'req/s':>6} {'p50':>6} {'p95':>6} {'p99':>6} {'wait50':>6} "
          f"{'batch':>5} {'x peer':>6} {'cpu/req':>7} {'http':>5}")
    peer = {r.load: r for r in rows if r.server == "litserve"}
    for r in rows:
        ratio = r.throughput / peer[r.load].throughput if r.load in peer and peer[r.load].throughput else None
        if r.load == "lone" and r.server != "litserve" and "lone" in peer:
            ratio = peer["lone"].p50 / r.p50  # a lone request: speed, not throughput
        wait = f"{r.queue_wait_p50:6.2f}" if r.queue_wait_p50 is not None else f"{'-':>6}"
        cpu = (f"{r.extra['cpu_http'] + r.extra['cpu_rest']:7.2f} {r.extra['cpu_http']:5.2f}"
               if "cpu_http" in r.extra else f"{'-':>7} {'-':>5}")
        print(f"{NAMES[r.server]:36} {r.load:13} {r.requests:>4} {r.throughput:>6.2f} {r.p50:>6.2f} {r.p95:>6.2f} "
              f"{r.p99:>6.2f} {wait} {(r.mean_batch or 0):>5.1f} {(f'{ratio:.2f}' if ratio else '-'):>6} {cpu}")
    staged = [r for r in rows if "stages_p50" in r.extra]
    if staged:
        print("\nwhere a request's time went, medians in ms (the job's timeline from its record; serving = the "
              "client's latency minus the job's total: HTTP, accept, wake-up, answer)")
        names = " ".join(f"{name:>11}" for name in STAGES)
        print(f"{'server':36} {'load':13} {names} {'p50':>8} {'peer p50':>8}")
        for r in staged:
            peer_p50 = f"{peer[r.load].p50 * 1000:8.0f}" if r.load in peer else f"{'-':>8}"
            print(f"{NAMES[r.server]:36} {r.load:13} "
                  + " ".join(f"{r.extra['stages_p50'][name] * 1000:11.0f}" if name in r.extra["stages_p50"]
                             else f"{'-':>11}" for name in STAGES)
                  + f" {r.p50 * 1000:8.0f} {peer_p50}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": size, "steps": steps, "device": device, "model": args.model or "tiny",
                               "capacity_images_per_s": capacity, "seconds": args.seconds,
                               "cpu_count": os.cpu_count(), "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
