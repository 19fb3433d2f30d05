"""`serve` and `worker` refuse what cannot work in one line, exit 2, before anything is printed
(`kolors_api.preflight`), and say at start what they use; the dependencies' noise stays out of the log
(`kolors_api.logs`). Every test is a real `kolors-api` process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, redis_db_url, start_process, start_server
from tests.test_startup import serve

#: A sitecustomize that makes the modules in KOLORS_TEST_BLOCK impossible to import, as in an install
#: without the extra that brings them.
BLOCKER = """\
import os, sys

class _Blocked:
    names = set(filter(None, os.environ.get("KOLORS_TEST_BLOCK", "").split(",")))

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
"""


def refused(out: object) -> str:
    """The one line of a refusal: exit 2, nothing on stdout, no traceback, nothing said before it."""
    assert getattr(out, "returncode", None) == 2, out
    stdout, stderr = getattr(out, "stdout"), getattr(out, "stderr")
    assert stdout == "", stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kolors-api: "), stderr
    assert "Traceback" not in stderr and "admin API key" not in stderr
    return str(lines[0])


def without(tmp_path: Path, *modules: str) -> dict[str, str | None]:
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "KOLORS_TEST_BLOCK": ",".join(modules)}


def test_a_worker_without_a_redis_store_is_refused_instead_of_watching_a_local_sqlite(tmp_path: Path) -> None:
    line = refused(subprocess.run([sys.executable, "-m", "kolors_api.cli", "worker", "--data-dir",
                                   str(tmp_path / "data")], cwd=tmp_path, capture_output=True, text=True, timeout=10,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"}))
    assert line == ("kolors-api: worker needs --store redis://HOST:PORT/DB (env KOLORS_API_STORE): a worker on "
                    "the embedded SQLite store never gets a job from another process; `serve` runs its own")
    assert not (tmp_path / "data").exists(), "refused before a store or the tiny model was made"


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_unreachable_redis_is_one_line_not_a_traceback(tmp_path: Path, command: str) -> None:
    port = free_port()
    line = refused(serve(tmp_path, "--store", f"redis://user:secret@127.0.0.1:{port}/0", command=command))
    assert line.startswith(f"kolors-api: store redis://***@127.0.0.1:{port}/0 cannot be reached (ConnectionError: ")
    assert line.endswith("start Redis there or fix --store (env KOLORS_API_STORE)") and "secret" not in line


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_device_that_is_no_device_is_refused_before_the_server_says_it_is_ready(tmp_path: Path,
                                                                                  command: str) -> None:
    store = ["--store", redis_db_url(14)] if command == "worker" else []
    line = refused(serve(tmp_path, "--device", "gpu", *store, command=command))
    # (the words of the engine processes' own check, kolors_api.worker.supervisor)
    assert line == ("kolors-api: --device 'gpu': expected cpu, cuda, cuda:N (or mps), a comma-separated list of "
                    "them (cuda:0,cuda:1), or all")
    # one of a list (the form of several engine processes) is checked too
    assert "--device 'cpu,cuda:x'" in refused(serve(tmp_path, "--device", "cpu,cuda:x", *store, command=command))


def test_a_cuda_device_this_machine_has_not_is_refused_naming_why(tmp_path: Path) -> None:
    from kolors_api import preflight

    line = refused(serve(tmp_path, "--device", "cuda:99"))
    if preflight.torch_cuda_build() is None:  # a CPU build of torch (CI, laptops)
        assert re.fullmatch(r"kolors-api: device cuda:99: this torch \(\S+\) is a build without CUDA; install "
                            r"the CUDA build of torch for your driver, or pass --device cpu", line), line
    elif (count := preflight.cuda_devices()) == 0:
        assert "no CUDA device is visible here" in line
    else:
        assert f"{count} CUDA device" in line and f"cuda:{count - 1}" in line


def test_serve_without_the_worker_extra_names_it_and_no_worker(tmp_path: Path) -> None:
    line = refused(serve(tmp_path, env=without(tmp_path, "PIL")))
    assert line == ("kolors-api: serve's in-process worker needs the `worker` extra, which is not installed "
                    "(module 'PIL' is missing): pip install -e '.[worker]' in the checkout, or run serve "
                    "--no-worker (an API without a worker)")


def test_a_base_install_running_worker_is_told_the_worker_extra(tmp_path: Path) -> None:
    env = without(tmp_path, "pydantic", "pydantic_settings", "fastapi", "diffusers", "PIL")
    line = refused(serve(tmp_path, "--store", redis_db_url(14), env=env, command="worker"))
    assert line == ("kolors-api: worker needs the `worker` extra, which is not installed (module 'pydantic' is "
                    "missing): pip install -e '.[worker]' in the checkout")


def test_blob_redirect_without_an_s3_blob_url_is_said_at_start(tmp_path: Path) -> None:
    srv = start_server("tiny", tmp_path, env={"KOLORS_API_BLOB_REDIRECT": "1"}, extra=["--no-worker"], ready=False)
    try:
        assert ("kolors-api: warning: KOLORS_API_BLOB_REDIRECT is on but the blob URL is not s3:// (it is unset); "
                "output URLs stream the images through the API") in srv.log().splitlines()
    finally:
        srv.stop()


def test_start_up_shows_our_lines_and_none_of_the_dependencies_noise(tiny_model: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_model, tmp_path)
    try:
        r = httpx.post(srv.v1 + "/kolors", headers=srv.headers(), timeout=120,
                       json={"prompt": "a fox", "steps": 2, "width": 512, "height": 512})
        assert r.status_code == 200, r.text
        job_id = r.headers["x-request-id"]
        deadline = time.monotonic() + 30
        while f"job {job_id} " not in srv.log():
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
    finally:
        srv.stop()
    log = srv.log()
    # (the logger's name may say which engine process: kolors_api.worker[engine 0])
    assert re.search(rf"INFO kolors_api\.worker(\[engine \d+\])? job {job_id} key bootstrap: 512x512 x1, 2 steps, "
                     r"queued \d+\.\d\d s, ran \d+\.\d\d s: COMPLETED", log), log
    for noise in ("[transformers]", "Warning:", "deprecated", "torchvision"):
        assert noise not in log, log


def test_a_worker_says_which_store_it_watches(tiny_model: Path, tmp_path: Path) -> None:
    proc, log_path = start_process(["worker", "--store", redis_db_url(14), "--model", str(tiny_model),
                                    "--data-dir", str(tmp_path)], tmp_path, log_name="worker.log")
    try:
        deadline = time.monotonic() + 60
        while f"store {redis_db_url(14)} (fleet)" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert f"model {tiny_model}, device auto" in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_an_embedded_database_of_a_newer_kolors_api_is_refused_untouched(tmp_path: Path) -> None:
    import sqlite3

    from kolors_api.jobs.sqlite_schema import VERSION

    data = tmp_path / "data"
    data.mkdir()
    db = data / "kolors-api.sqlite3"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY)")
        c.execute(f"PRAGMA user_version={VERSION + 98}")
    before = db.read_bytes()
    line = refused(serve(tmp_path, "--no-worker"))
    assert line == (f"kolors-api: {db} has schema version {VERSION + 98}, newer than this kolors-api knows "
                    f"({VERSION}): run the kolors-api that made it, or a newer one")
    assert db.read_bytes() == before
    db.write_bytes(b"not a database at all, just some bytes that are long enough" * 10)
    line = refused(serve(tmp_path, "--no-worker"))
    assert line.startswith(f"kolors-api: {db} is not a database kolors-api can open (")
