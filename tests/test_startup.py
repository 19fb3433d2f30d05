"""`serve` and `worker` at start-up: a model that cannot be loaded is refused in one line before the
port is bound; a dead in-process worker is said (log, /readyz, /metrics) and ends `serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, free_port, redis_db_url, start_server

#: A loopback port where nothing listens: a hub that cannot be reached, refused at once.
CLOSED = f"http://127.0.0.1:{free_port()}"


def serve(tmp_path: Path, *args: str, env: dict[str, str | None] | None = None,
          command: str = "serve") -> subprocess.CompletedProcess[str]:
    """`kolors-api serve ARGS` to its end, which must come within 10 s (the issue's promise)."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kolors_api.cli", command, "--data-dir", str(tmp_path / "data"),
                           *(["--port", str(free_port())] if command == "serve" else ["--store", redis_db_url(14)]),
                           *args],
                          env={k: v for k, v in full.items() if v is not None},
                          capture_output=True, text=True, timeout=10)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Uvicorn running" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kolors-api: model: ")
    return lines[0]


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_model_path_that_does_not_exist_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    line = one_line(serve(tmp_path, "--model", "/nonexistent/kolors", command=command))
    assert "no such folder /nonexistent/kolors" in line and "local diffusers folder" in line
    assert not (tmp_path / "data").exists(), "refused before the store was made"


def test_a_folder_that_is_no_pipeline_is_refused(tmp_path: Path) -> None:
    line = one_line(serve(tmp_path, "--model", str(tmp_path)))
    assert f"{tmp_path} is a folder but not a diffusers pipeline (no model_index.json)" in line


def test_a_repo_neither_cached_nor_reachable_is_refused_naming_the_hub_and_what_to_do(tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    line = one_line(serve(tmp_path, "--model", "Kwai-Kolors/Kolors-diffusers",
                          env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": CLOSED, "HF_HUB_CACHE": str(cache)}))
    assert f"Kwai-Kolors/Kolors-diffusers is not in the Hugging Face cache ({cache})" in line
    assert f"the hub at {CLOSED} cannot be reached (ConnectError" in line
    assert "local diffusers folder" in line and "HF_HUB_OFFLINE=1" in line


def test_offline_a_repo_not_in_the_cache_is_refused_without_asking_the_hub(tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    line = one_line(serve(tmp_path, "--model", "Kwai-Kolors/Kolors-diffusers",
                          env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": CLOSED, "HF_HUB_CACHE": str(cache)}))
    assert "HF_HUB_OFFLINE is set, so the hub was not asked" in line and CLOSED not in line


def test_kolors_api_worker_false_is_honoured_and_the_start_up_line_says_where_data_lives(tmp_path: Path) -> None:
    # No worker, so the model is never checked: a path that does not exist serves all the same.
    srv = start_server("/nonexistent/kolors", tmp_path, env={"KOLORS_API_WORKER": "false"}, ready=False)
    try:
        ready = httpx.get(srv.url + "/readyz")
        assert (ready.status_code, ready.json()) == (503, {"error": "no worker alive"})
        metrics = httpx.get(srv.url + "/metrics").text
        assert "kolors_embedded_worker_up 0.0" in metrics
        assert f"data in {tmp_path.resolve()} (store kolors-api.sqlite3, images under outputs/); " \
               f"no engine process" in srv.log()
    finally:
        srv.stop()


def test_fleet_mode_without_the_redis_extra_says_which_extra_in_one_line(tmp_path: Path) -> None:
    # An install without the `redis` extra: a `redis` package that is not there.
    missing = tmp_path / "site" / "redis"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'redis'\", name='redis')\n")
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    out = serve(tmp_path, "--no-worker", "--store", redis_db_url(15), env={"PYTHONPATH": path})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        "kolors-api: fleet mode (a redis:// store) needs the `redis` extra, which is not installed (module "
        "'redis' is missing): pip install -e '.[redis]' in the checkout")


@pytest.mark.parametrize(("status", "words"), [
    (401, "has no repo Kwai-Kolors/Kolors-nope that this machine may read (HTTP 401); check the name"),
    (500, "is not in the Hugging Face cache"),
])
def test_a_repo_the_hub_refuses_is_refused_with_what_the_hub_said(tmp_path: Path, status: int, words: str) -> None:
    import http.server
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - the http.server hook
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=hub.serve_forever, args=(0.05,), daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
        line = one_line(serve(tmp_path, "--model", "Kwai-Kolors/Kolors-nope",
                              env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": endpoint,
                                   "HF_HUB_CACHE": str(tmp_path / "hf-cache")}))
    finally:
        hub.shutdown()
    assert words in line and endpoint in line
    if status == 500:
        assert "answered HTTP 500" in line


def test_a_second_serve_on_a_busy_port_stops_in_one_line_before_it_touches_store_or_model(tmp_path: Path) -> None:
    first = start_server("/nonexistent/kolors", tmp_path / "first", env={"KOLORS_API_WORKER": "false"}, ready=False)
    port = first.url.rsplit(":", 1)[1]
    try:
        # A model that cannot be loaded, and a data dir of its own: had the port not come first, the
        # model's refusal would be the line, and the data dir would exist.
        second = subprocess.run([sys.executable, "-m", "kolors_api.cli", "serve", "--port", port,
                                 "--data-dir", str(tmp_path / "second"), "--model", "/nonexistent/kolors"],
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "KOLORS_API_BOOTSTRAP_KEY": ADMIN_KEY},
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert second.stdout == ""
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"kolors-api: port {port} on 127.0.0.1 is in use: ")
        assert "pass --port" in lines[0]
        assert not (tmp_path / "second").exists(), "the store was opened"
        # The first server is untouched and still answers.
        assert httpx.get(first.url + "/healthz").status_code == 200
    finally:
        first.stop()
    assert "startup complete" not in second.stderr and "Playground" not in second.stderr
