"""What the serving path adds to the engine's own call: a CPU proxy of a GPU server.

`kolors-api serve --engine stub_engine:stub` (bench/stub_engine.py): each step waits
`--step-ms` with the GIL released (as the host waits on a CUDA queue), then runs `--py-ms` of
Python. N jobs of one shape are queued at once, so the worker runs them in one engine call. Per
case, the median over `--rounds` calls of:

- **engine call**: the stub's own wall time for the call (its `inference_time`); what it would be
  alone is steps × (step + Python), so `engine +%` is what the worker's step callbacks and the
  API's event loop took from the engine thread (the GIL);
- **serving**: from the call's start to the last job's COMPLETED, over the engine call (`serve +%`):
  storing progress and outcomes;
- **per step**: the engine call's added milliseconds per step.

Cases: no watchers; every job watched by an event stream with previews (the playground); and the
same while `--pollers` clients poll job status as fast as they can (the API's event loop busy).
Run it against another checkout's code with `PYTHONPATH=OTHER/src` (the server inherits it).

    .venv/bin/python bench/serving_path.py                       # 8 and 16 jobs, 25 steps
    .venv/bin/python bench/serving_path.py --jobs 16 --rounds 5 --store redis://127.0.0.1:6379/9
    .venv/bin/python bench/serving_path.py --store redis://127.0.0.1:6379/9 --split   # worker apart
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import wait_up  # noqa: E402  (bench/ is not a package)
from serving import KEY, free_port  # noqa: E402


def start(args: argparse.Namespace, work: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    """`serve` with its in-process worker, or with `--split` `serve --no-worker` and a `worker` process."""
    port = free_port()
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": KEY, "KOLORS_API_LOG_LEVEL": "warning",
           "KOLORS_STUB_STEP_S": str(args.step_ms / 1000), "KOLORS_STUB_PY_MS": str(args.py_ms),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), here]))}
    engine = ["--engine", "stub_engine:stub", "--max-batch-images", str(max(args.jobs_list))]
    store = ["--store", args.store] if args.store else []
    cmds = [["serve", "--port", str(port), "--data-dir", str(work), *store,
             *(["--no-worker"] if args.split else engine)]]
    if args.split:
        cmds.append(["worker", "--data-dir", str(work), *store, *engine])
    procs = [subprocess.Popen([sys.executable, "-m", "kolors_api.cli", *cmd], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True) for cmd in cmds]
    url = f"http://127.0.0.1:{port}"
    wait_up(url, procs[0], "/readyz")
    return procs, url


def watch(url: str, request_id: str, stop: threading.Event) -> None:
    with contextlib.suppress(httpx.HTTPError), httpx.Client(base_url=url, headers={"x-api-key": KEY},
                                                            timeout=60) as client, \
            client.stream("GET", f"/v2/requests/{request_id}/events?previews=1") as r:
        for line in r.iter_lines():
            if stop.is_set() or line.startswith("event: completed") or line.startswith("event: failed"):
                return


def poll(url: str, ids: list[str], stop: threading.Event) -> None:
    with contextlib.suppress(httpx.HTTPError), httpx.Client(base_url=url, headers={"x-api-key": KEY},
                                                            timeout=60) as client:
        n = 0
        while not stop.is_set():
            client.get(f"/v2/requests/{ids[n % len(ids)]}/status")
            n += 1


def one_call(url: str, jobs: int, steps: int, watchers: bool, pollers: int) -> dict[str, float]:
    body = {"prompt": "a lighthouse", "steps": steps, "width": 512, "height": 512}
    with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=60) as client:
        # Queued while a job of another shape holds the worker, so that they run in one call.
        client.post("/v2/kolors", json={**body, "steps": 6, "prompt": "blocker"})
        time.sleep(0.1)
        ids = [client.post("/v2/kolors", json={**body, "prompt": f"job {n}"}).json()["request_id"]
               for n in range(jobs)]
        stop = threading.Event()
        threads = [threading.Thread(target=watch, args=(url, i, stop), daemon=True) for i in ids if watchers]
        threads += [threading.Thread(target=poll, args=(url, ids, stop), daemon=True) for _ in range(pollers)]
        for t in threads:
            t.start()
        results = []
        for request_id in ids:
            while True:
                r = client.get(f"/v2/requests/{request_id}")
                if r.status_code == 200:
                    results.append(r.json())
                    break
                time.sleep(0.02)
        stop.set()
    call = statistics.median(res["metrics"]["inference_time"] for res in results)
    # the jobs of one call start together: from there to the last one's completion
    served = max(res["metrics"]["total_time"] - res["metrics"]["queue_time"] for res in results)
    return {"engine": call, "served": served}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="8,16")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--step-ms", type=float, default=50.0)
    ap.add_argument("--py-ms", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pollers", type=int, default=8)
    ap.add_argument("--store", default=None, help="e.g. redis://127.0.0.1:6379/9 (default: the embedded SQLite)")
    ap.add_argument("--split", action="store_true", help="the worker in a process of its own (needs --store redis)")
    ap.add_argument("--out", default="bench/results/serving_path.json")
    args = ap.parse_args()
    args.jobs_list = [int(j) for j in args.jobs.split(",")]
    ideal = args.steps * (args.step_ms + args.py_ms) / 1000
    work = Path(tempfile.mkdtemp(prefix="kolors-path-bench-"))
    procs, url = start(args, work)
    rows: list[dict[str, Any]] = []
    try:
        one_call(url, 1, 2, False, 0)  # warm-up
        for jobs in args.jobs_list:
            for case, watchers, pollers in (("no watchers", False, 0), ("previews watched", True, 0),
                                            (f"watched + {args.pollers} pollers", True, args.pollers)):
                got = [one_call(url, jobs, args.steps, watchers, pollers) for _ in range(args.rounds)]
                engine = statistics.median(g["engine"] for g in got)
                served = statistics.median(g["served"] for g in got)
                rows.append({"jobs": jobs, "case": case, "engine_s": engine, "served_s": served, "ideal_s": ideal,
                             "engine_pct": 100 * (engine / ideal - 1), "serve_pct": 100 * (served / engine - 1),
                             "added_ms_per_step": 1000 * (engine - ideal) / args.steps})
                r = rows[-1]
                print(f"  {jobs:2} jobs, {case:24} engine {engine:6.3f}s (+{r['engine_pct']:4.1f} %)  "
                      f"served {served:6.3f}s (+{r['serve_pct']:4.1f} %)  +{r['added_ms_per_step']:.2f} ms/step",
                      flush=True)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    print(f"\nstub engine: {args.steps} steps of {args.step_ms:g} ms GIL-free + {args.py_ms:g} ms Python "
          f"(alone {ideal:.3f} s a call); store {args.store or 'sqlite'}; worker "
          f"{'in a process of its own' if args.split else 'in the serve process'}; median of {args.rounds}")
    print(f"{'jobs':>4} {'case':26} {'engine s':>8} {'engine +%':>9} {'ms/step':>7} {'served s':>8} {'serve +%':>8}")
    for r in rows:
        print(f"{r['jobs']:>4} {r['case']:26} {r['engine_s']:>8.3f} {r['engine_pct']:>9.1f} "
              f"{r['added_ms_per_step']:>7.2f} {r['served_s']:>8.3f} {r['serve_pct']:>8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "step_ms": args.step_ms, "py_ms": args.py_ms,
                               "store": args.store or "sqlite", "split": args.split, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
