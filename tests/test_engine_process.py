"""`serve`'s engine processes (`kolors_api.worker.supervisor`): the API answers while an engine dies
and comes back, the job it held runs again and is charged once, a crash loop backs off, SIGTERM ends
everything within the grace, and `--device cpu,cpu` runs two engines that both take jobs. The processes
are the point, not the pixels: the engines are tests/pixel_engines.py's (torch-free, up in about a second)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kolors_api.schema import GenerateParams, price
from tests.conftest import LiveServer, free_port, job_status, start_process, start_server, wait_up
from tests.conftest import wait_for_status as wait_for
from tests.engines import ENGINE_ENV
from tests.pixel_engines import serving

SMALL = {"steps": 4, "width": 512, "height": 512, "output_format": "png"}


def engines(server: LiveServer) -> list[dict[str, Any]]:
    """The engine processes as `/readyz` lists them (empty while none is ready)."""
    r = httpx.get(server.url + "/readyz", timeout=10)
    return list(r.json().get("engines", [])) if r.status_code == 200 else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def account(server: LiveServer, key: str) -> dict[str, Any]:
    return dict(httpx.get(server.url + "/v1/account", headers={"x-api-key": key}, timeout=10).json())


def test_a_sigkilled_engine_comes_back_and_its_job_completes_once_charged_once(tmp_path: Path) -> None:
    mark = tmp_path / "killed"
    server = start_server("tiny", tmp_path, **serving("kill_once", env={
        "KOLORS_TEST_KILL_MARK": str(mark), "KOLORS_API_LEASE_SECONDS": "3", "KOLORS_API_HEARTBEAT_SECONDS": "1"}))
    try:
        first = engines(server)[0]
        key = server.create_key(credits=10)["key"]
        r = httpx.post(server.url + "/v2/kolors", headers={"x-api-key": key}, json={"prompt": "crash here", **SMALL})
        request_id = r.json()["request_id"]
        # The engine SIGKILLs itself at step 2: the API answers all along, /readyz says why it is not ready.
        causes = set()
        deadline = time.monotonic() + 120
        while job_status(server, key, request_id)["status"] != "COMPLETED":
            assert time.monotonic() < deadline, server.log()[-3000:]
            assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
            ready = httpx.get(server.url + "/readyz", timeout=5)
            if ready.status_code == 503:
                causes.add(ready.json()["error"])
            time.sleep(0.05)
        assert mark.exists() and not alive(first["pid"])
        assert any("killed by SIGKILL" in cause for cause in causes), causes
        again = engines(server)[0]
        assert again["pid"] != first["pid"] and again["restarts"] == 1 and "SIGKILL" in again["last_exit"]
        metrics = httpx.get(server.url + "/metrics").text
        assert 'kolors_engine_restarts{device="auto",engine="0"} 1.0' in metrics
        assert 'kolors_engine_up{device="auto",engine="0"} 1.0' in metrics
        assert 'kolors_job_stage_seconds_count{stage="call_time"} 1.0' in metrics
        assert len(re.findall(r"engine process 0 \(auto, pid \d+\) exited: killed by SIGKILL", server.log())) == 1
        # charged once: one request, its price spent, nothing held back
        cost = price(GenerateParams.from_dict({"prompt": "crash here", **SMALL}))
        usage = account(server, key)
        assert usage["usage"]["requests"] == 1 and usage["usage"]["credits_reserved"] == 0
        assert usage["usage"]["credits_spent"] == pytest.approx(cost) and usage["credits"] == pytest.approx(10 - cost)
    finally:
        server.stop()


def test_an_engine_that_cannot_load_is_restarted_with_backoff_while_the_api_serves(tmp_path: Path) -> None:
    port = free_port()
    proc, log = start_process(["serve", "--port", str(port), "--data-dir", str(tmp_path),
                               "--engine", "tests.engines:unloadable"], tmp_path, env=ENGINE_ENV)
    server = LiveServer(url=f"http://127.0.0.1:{port}", data_dir=tmp_path, proc=proc, log_path=log)
    try:
        wait_up(server, ready=False)
        deadline = time.monotonic() + 120
        while "(restart 2)" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        exits = [line for line in log.read_text().splitlines() if " exited: " in line]
        cause = "exit code 1: OSError: injected: weights not fully cached"
        assert exits[0].endswith(f"exited: {cause}; starting it again in 1 s (restart 1)"), exits
        assert exits[1].endswith(f"exited: {cause}; starting it again in 2 s (restart 2)"), exits
        assert "Traceback" not in "\n".join(exits)
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert cause in ready.json()["error"] and ready.json()["error"].startswith("no engine ready: engine process 0")
        assert "kolors_embedded_worker_up 0.0" in httpx.get(server.url + "/metrics").text
        # With no engine ready a sync request is refused, an async submit waits for one.
        sync = httpx.post(server.url + "/v1/kolors", json={"prompt": "a fox"}, headers=server.headers())
        assert (sync.status_code, sync.json()) == (503, {"error": "no worker alive"})
        queued = httpx.post(server.url + "/v2/kolors", json={"prompt": "a fox"}, headers=server.headers())
        assert queued.status_code == 200 and queued.json()["status"] == "QUEUED"
    finally:
        server.stop()
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done


def test_sigterm_ends_serve_within_the_grace_and_the_job_in_hand_runs_after_the_restart(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path, **serving("slow", env={
        "KOLORS_TEST_STEP_SECONDS": "1", "KOLORS_API_SHUTDOWN_GRACE_SECONDS": "2"}))
    try:
        engine = engines(server)[0]
        r = httpx.post(server.url + "/v2/kolors", headers=server.headers(), json={"prompt": "a long one",
                                                                                 **SMALL, "steps": 40})
        request_id = r.json()["request_id"]
        wait_for(server, server.key, request_id, lambda body: body["status"] == "PROCESSING")
        started = time.monotonic()
        server.proc.terminate()
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        took = time.monotonic() - started
        # the grace (2 s) and the process's own exit, not the job's 40 s
        assert took < 15, took
        assert not alive(engine["pid"])
        assert "still running at the end of the shutdown grace: killed; its job goes back to the queue" in server.log()
    finally:
        server.stop()
    port = int(server.url.rsplit(":", 1)[1])
    server = start_server("tiny", tmp_path, port=port, log_name="server2.log", **serving())  # not slow
    try:
        assert wait_for(server, server.key, request_id, lambda b: b["status"] == "COMPLETED")["status"] == "COMPLETED"
    finally:
        server.stop()


def test_two_engines_on_cpu_cpu_both_take_jobs(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path, **serving("slow", env={"KOLORS_TEST_STEP_SECONDS": "0.5"},
                                                      extra=["--device", "cpu,cpu", "--max-batch-images", "1"]))
    try:
        deadline = time.monotonic() + 120
        while [e["state"] for e in engines(server)] != ["ready", "ready"]:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        assert [e["device"] for e in engines(server)] == ["cpu", "cpu"]
        ids = [httpx.post(server.url + "/v2/kolors", headers=server.headers(),
                          json={"prompt": f"job {i}", **SMALL, "steps": 8}).json()["request_id"] for i in range(2)]
        # both run at once: one engine each (one image per engine call)
        deadline = time.monotonic() + 120
        while [job_status(server, server.key, i)["status"] for i in ids] != ["PROCESSING", "PROCESSING"]:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.05)
        for request_id in ids:
            assert wait_for(server, server.key, request_id, lambda b: b["status"] == "COMPLETED")
    finally:
        server.stop()


def test_a_device_that_is_no_device_is_refused_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "kolors_api.cli", "serve", "--device", "gpu", "--data-dir",
                        str(tmp_path), "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["kolors-api: --device 'gpu': expected cpu, cuda, cuda:N (or mps), a "
                                             "comma-separated list of them (cuda:0,cuda:1), or all"]


def test_the_api_process_imports_no_torch() -> None:
    code = "import sys, kolors_api.api.app, kolors_api.worker.supervisor; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
