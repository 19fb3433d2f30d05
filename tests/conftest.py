"""Shared fixtures: the tiny model (built once per session), live servers on loopback, stores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

ADMIN_KEY = "kol_test_admin_key_0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the test Redis: a private redis-server per test process (per xdist worker), never the machine's
class _SessionRedis:
    """A `redis-server` of this test process's own (no persistence, on a free port), started on first
    use and stopped when the process ends; it dies with the process even on SIGKILL (PDEATHSIG).
    `KOLORS_API_TEST_REDIS_ADDR=HOST:PORT` names a Redis to use instead (its databases 0-15 are
    flushed by the tests that use them)."""

    def __init__(self) -> None:
        self.addr: str | None = os.environ.get("KOLORS_API_TEST_REDIS_ADDR") or None
        self.proc: subprocess.Popen[bytes] | None = None
        #: Why there is no Redis to test against, when there is none.
        self.missing: str | None = None

    def address(self) -> str:
        if self.addr is None:
            self.addr = self._start()
        return self.addr

    def _start(self) -> str:
        import atexit
        import shutil
        import tempfile

        binary = shutil.which("redis-server")
        if binary is None:
            # an address where nothing answers: the tests that need Redis fail there, saying why
            self.missing = "redis-server is not installed (.ci/install-redis installs it)"
            return f"127.0.0.1:{free_port()}"
        workdir = tempfile.mkdtemp(prefix="kolors-test-redis-")
        for _ in range(5):
            port = free_port()
            self.proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", workdir, "--logfile", "", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                        conn.sendall(b"PING\r\n")
                        if conn.recv(16).startswith(b"+PONG"):
                            atexit.register(self.stop)
                            return f"127.0.0.1:{port}"
                except OSError:
                    time.sleep(0.02)
            self.stop()  # the port was taken between free_port() and the bind: try another
        raise RuntimeError("the test redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the test process dies (Linux; elsewhere a no-op)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: S110 - not Linux: atexit stops it
        pass


_SESSION_REDIS = _SessionRedis()


def _one_ssl_context() -> None:
    """The tests' top-level httpx calls (`httpx.get(...)`: hundreds, many in polling loops) each build a
    client, and each client an SSL context from certifi's bundle: about 30 ms of CPU a call, for
    loopback http that never uses it. In the test process, the default context is built once (an
    `ssl.SSLContext` is safe to share; nothing changes one); any other `verify` is built as asked."""
    from httpx._transports import default

    original = default.create_ssl_context
    made: dict[tuple[bool, str | None, str | None], Any] = {}

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is not True or cert is not None:
            return original(verify=verify, cert=cert, trust_env=trust_env)
        key = (trust_env, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        if key not in made:
            made[key] = original(verify=verify, cert=cert, trust_env=trust_env)
        return made[key]

    default.create_ssl_context = create_ssl_context  # type: ignore[assignment]


_one_ssl_context()


def redis_db_url(db: int) -> str:
    """The URL of database `db` on the test Redis (this test process's private redis-server)."""
    return f"redis://{_SESSION_REDIS.address()}/{db}"


def __getattr__(name: str) -> str:
    # REDIS_ADDR and REDIS_URL start the private redis-server only when a test module imports them.
    if name == "REDIS_ADDR":
        return _SESSION_REDIS.address()
    if name == "REDIS_URL":
        return os.environ.get("KOLORS_API_TEST_REDIS") or redis_db_url(0)
    raise AttributeError(name)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline tiny Kolors pipeline, built once for the whole session through the CLI."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([sys.executable, "-m", "kolors_api.cli", "tiny-model", str(path)], check=True,
                   capture_output=True, timeout=300)
    return path


@dataclass
class LiveServer:
    """A `kolors-api serve` (or `worker`) process on loopback."""

    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    key: str = ADMIN_KEY
    env: dict[str, str] = field(default_factory=dict)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"x-api-key": key or self.key}

    def create_key(self, **fields: Any) -> dict[str, Any]:
        """A new key made through the admin API (`{"name": "user", **fields}`): the 201 body."""
        r = httpx.post(self.url + "/v1/admin/keys", json={"name": "user", **fields}, headers=self.headers())
        assert r.status_code == 201, r.text
        return dict(r.json())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = 9) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_process(args: list[str], data_dir: Path, env: dict[str, str | None] | None = None,
                  log_name: str = "server.log") -> tuple[subprocess.Popen[bytes], Path]:
    """Run `kolors-api ARGS` with the test environment updated by `env` (a None value removes the
    variable: `{"KOLORS_API_BOOTSTRAP_KEY": None}` starts with no bootstrap key)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / log_name
    # PASSIVE: torch's OpenMP threads sleep instead of spinning, so servers that share the cores with
    # the test process (and with each other) do not starve it.
    wanted = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1",
              "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    full_env = {name: value for name, value in wanted.items() if value is not None}
    log = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "kolors_api.cli", *args], env=full_env,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def job_status(server: LiveServer, key: str, request_id: str) -> dict[str, Any]:
    """`GET /v2/requests/{id}/status` with `key`, as a dict."""
    r = httpx.get(f"{server.url}/v2/requests/{request_id}/status", headers={"x-api-key": key}, timeout=10)
    return dict(r.json())


def wait_for_status(server: LiveServer, key: str, request_id: str, done: Any, *, timeout: float = 180,
                    interval: float = 0.05) -> dict[str, Any]:
    """Poll the status until `done(body)`; a terminal status that is not `done` fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = job_status(server, key, request_id)
        if done(body):
            return body
        assert body["status"] not in ("COMPLETED", "FAILED"), body
        time.sleep(interval)
    raise AssertionError(f"{request_id}: condition never met; last status {body}\n{server.log()[-3000:]}")


def start_server(model: Path | str, data_dir: Path, *, port: int | None = None,
                 env: dict[str, str | None] | None = None,
                 extra: list[str] | None = None, ready: bool = True, log_name: str = "server.log") -> LiveServer:
    port = port or free_port()
    args = ["serve", "--port", str(port), "--data-dir", str(data_dir), "--model", str(model), *(extra or [])]
    proc, log_path = start_process(args, data_dir, env, log_name)
    server = LiveServer(url=f"http://127.0.0.1:{port}", data_dir=data_dir, proc=proc, log_path=log_path,
                        env={name: value for name, value in (env or {}).items() if value is not None})
    wait_up(server, ready=ready)
    return server


def wait_up(server: LiveServer, *, ready: bool = True, timeout: float = 120) -> None:
    path = "/readyz" if ready else "/healthz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not {'ready' if ready else 'up'} in {timeout}s:\n{server.log()}")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One embedded server (SQLite + in-process worker, tiny model) shared by a test module."""
    srv = start_server(tiny_model, tmp_path_factory.mktemp("server"),
                       env={"KOLORS_API_SYNC_TIMEOUT_SECONDS": "120"})
    yield srv
    srv.stop()


@pytest.fixture
def api(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as client:
        yield client


def skip_or_fail(reason: str) -> NoReturn:
    """A missing dependency of a test fails it: in CI a skip would pass silently. Set
    KOLORS_API_ALLOW_SKIP=1 to skip instead (a laptop without Redis)."""
    if os.environ.get("KOLORS_API_ALLOW_SKIP") == "1":
        pytest.skip(reason)
    pytest.fail(f"{reason} (set KOLORS_API_ALLOW_SKIP=1 to skip such tests instead)", pytrace=False)


def flushed_redis(url: str) -> Iterator[Any]:
    """A client of an emptied Redis db for fleet tests (emptied again after). When redis-py or our
    Redis backend is missing or no server answers, the test fails (skips with KOLORS_API_ALLOW_SKIP=1).
    Each test module uses a db of its own."""
    try:
        import redis
    except ImportError as exc:
        skip_or_fail(f"redis-py is not installed: {exc}")
    try:
        import kolors_api.jobs.redis  # noqa: F401
    except Exception as exc:
        skip_or_fail(f"the Redis store does not import: {exc}")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except Exception as exc:
        client.close()
        skip_or_fail(f"no Redis at {url}: {_SESSION_REDIS.missing or exc}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, and immune to other processes competing for the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the suite's own rules: what counts as slow, and no silent skips
#: Fixtures that start a process of their own: the tiny model (built by the CLI, loaded by servers
#: and workers), the modules' servers and the fleets (test_fleet.py, test_events_fleet.py).
#: A test that uses one is `slow`, and the fast lane
#: (`pytest -m "not slow"`) leaves it out: what stays is in-process (stores on SQLite and Redis,
#: schema, settings, signing, layout, client, engine).
SLOW_FIXTURES = {"tiny_model", "server", "srv", "api_only", "fleet"}
#: Modules slow as a whole: fuzzing runs hundreds of requests; the others start servers or the CLI
#: in most tests.
SLOW_MODULES = {"test_schemathesis", "test_cli_keys", "test_embedded_promises", "test_worker_failures",
                "test_accounts", "test_credits", "test_rate_limits", "test_startup"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module is not None else ""
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def _no_skips(report: pytest.CollectReport | pytest.TestReport) -> None:
    """A skip is a failure unless KOLORS_API_ALLOW_SKIP=1: CI must not pass with tests left out."""
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("KOLORS_API_ALLOW_SKIP") != "1":
        report.outcome = "failed"
        report.longrepr = f"skipped, and a skip is a failure here (KOLORS_API_ALLOW_SKIP=1 allows it): " \
                          f"{report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _no_skips(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _no_skips(outcome.get_result())


# A real S3 endpoint on loopback (moto's server mode) for the s3:// blob store tests; imported last,
# as it uses the helpers above.
from tests.s3_helpers import moto_s3, s3_url  # noqa: E402, F401
