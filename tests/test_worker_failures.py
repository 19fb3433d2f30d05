"""Worker failures end to end, on a real `serve` with a broken engine (tests/pixel_engines.py, torch-free):
a running job cancelled, an engine error through the segmind SDK, a crash mid-step, a bad `--engine`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from segmind import SegmindClient
from segmind.exceptions import SegmindError
from segmind.v2 import InferenceFailed

from tests.conftest import LiveServer, redis_db_url, start_server
from tests.conftest import wait_for_status as wait_for
from tests.engines import ENGINE_ENV

SMALL = {"steps": 2, "width": 512, "height": 512, "output_format": "png"}


def serve_with(engine: str, data_dir: Path, **kwargs: Any) -> LiveServer:
    """`serve` on `engine` of tests/pixel_engines.py: the broken engines, torch-free."""
    return start_server("tiny", data_dir, env=ENGINE_ENV, extra=["--engine", f"tests.pixel_engines:{engine}"],
                        **kwargs)


def finished(body: dict[str, Any]) -> bool:
    return body["status"] in ("COMPLETED", "FAILED")


def credits(server: LiveServer, key: str) -> float:
    return float(httpx.get(server.url + "/v1/account", headers={"x-api-key": key}, timeout=10).json()["credits"])


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = serve_with("slow", tmp_path_factory.mktemp("slow"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def failing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = serve_with("failing", tmp_path_factory.mktemp("failing"))
    yield srv
    srv.stop()


def test_cancelling_a_running_job_fails_it_refunds_it_and_the_worker_goes_on(slow_server: LiveServer) -> None:
    server = slow_server
    key = server.create_key(credits=5)["key"]
    r = httpx.post(server.url + "/v2/kolors", headers={"x-api-key": key},
                   json={"prompt": "a long one", **SMALL, "steps": 40})
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    assert credits(server, key) < 5  # charged on submit
    wait_for(server, key, request_id, lambda b: b["status"] == "PROCESSING" and b["progress"]["step"] >= 1)

    r = httpx.post(f"{server.url}/v2/requests/{request_id}/cancel", headers={"x-api-key": key})
    assert r.status_code == 200 and r.json()["cancel_requested"] is True

    body = wait_for(server, key, request_id, finished, timeout=60)
    assert body == {"request_id": request_id, "status": "FAILED", "error": "cancelled"}
    assert credits(server, key) == 5

    r = httpx.post(server.url + "/v2/kolors", headers={"x-api-key": key}, json={"prompt": "the next one", **SMALL})
    following = r.json()["request_id"]
    assert wait_for(server, key, following, finished)["status"] == "COMPLETED"
    assert credits(server, key) == pytest.approx(5 - 0.02)


ENGINE_ERROR = "engine error: the model could not generate this request"


def test_an_engine_error_fails_the_job_and_the_segmind_sdk_sees_it(failing_server: LiveServer) -> None:
    sdk = SegmindClient(api_key=failing_server.key, base_url=failing_server.v1, timeout=120)
    with pytest.raises(SegmindError) as sync_err:
        sdk.run_sync("kolors", prompt="please fail now", **SMALL)
    assert sync_err.value.status == 422
    # The client reads what it can act on; the exception's own text goes to the server's log only.
    assert sync_err.value.detail.startswith(ENGINE_ERROR), sync_err.value.detail
    assert "injected fault" not in sync_err.value.detail and "RuntimeError" not in sync_err.value.detail

    job = sdk.submit_async("kolors", prompt="fail again", **SMALL)
    with pytest.raises(InferenceFailed) as err:
        job.wait(timeout=120, interval=0.1)
    assert err.value.detail == f"{ENGINE_ERROR} (logged on the server as job {job.request_id})"
    assert err.value.status_body["status"] == "FAILED"
    r = httpx.get(f"{failing_server.url}/v2/requests/{job.request_id}", headers=failing_server.headers())
    assert r.status_code == 422 and r.json()["error"] == err.value.detail
    assert "RuntimeError: injected fault" in failing_server.log()

    # The same worker, a prompt the engine does not trip on.
    assert sdk.run("kolors", prompt="a quiet harbour", **SMALL)["status"] == "COMPLETED"


def test_a_server_killed_mid_step_leaves_no_engine_and_completes_the_job_after_restart(tmp_path: Path) -> None:
    server = serve_with("slow", tmp_path)
    try:
        engine_pid = httpx.get(server.url + "/readyz").json()["engines"][0]["pid"]
        r = httpx.post(server.url + "/v2/kolors", headers=server.headers(),
                       json={"prompt": "killed mid-step", **SMALL, "steps": 8})
        request_id = r.json()["request_id"]
        wait_for(server, server.key, request_id, lambda body: body["status"] == "PROCESSING")
        server.kill(signal.SIGKILL)
        # its engine process goes with it (no orphan holding the job or the cores)
        for _ in range(600):
            try:
                os.kill(engine_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the engine process outlived its serve")
    finally:
        server.stop()
    port = int(server.url.rsplit(":", 1)[1])
    server = serve_with("pixels", tmp_path, port=port, log_name="server2.log")  # an engine that does not crash
    try:
        assert wait_for(server, server.key, request_id, finished)["status"] == "COMPLETED"
    finally:
        server.stop()


@pytest.mark.parametrize(("command", "engine", "message"), [
    ("serve", "no_such_module:factory",
     "kolors-api: engine: cannot import 'no_such_module' (No module named 'no_such_module')"),
    ("serve", "tests.engines:no_such_factory", "kolors-api: engine: 'tests.engines' has no callable 'no_such_factory'"),
    ("serve", "tests.engines", "kolors-api: engine: 'tests.engines' is not of the form package.module:factory"),
    ("worker", "no_such_module:factory",
     "kolors-api: engine: cannot import 'no_such_module' (No module named 'no_such_module')"),
])
def test_a_bad_engine_path_refuses_to_start_in_one_line(command: str, engine: str, message: str,
                                                        tmp_path: Path) -> None:
    store = ["--store", redis_db_url(14)] if command == "worker" else []  # a worker needs the fleet's store
    r = subprocess.run([sys.executable, "-m", "kolors_api.cli", command, "--engine", engine, "--data-dir",
                        str(tmp_path), *store], env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [message]
