"""Engine processes, one per device, started and watched by `serve` and `kolors-api worker`.

The supervisor lives in the API's process (or `kolors-api worker`'s) and imports no torch. Each
engine process (`kolors_api.worker.process`) is spawned, never forked (CUDA needs a fresh process),
and runs the worker loop on its own connection to the store. One that dies (SIGKILL, a CUDA abort,
a segfault, the OOM killer) is logged in one line with its cause and started again after a backoff
(1 s, doubling to 30 s; back to 1 s once one has run a minute); the job it held goes back to the
queue when its lease runs out and is charged once. `stop(grace)` drains every engine (the job in
hand finishes) and kills what is still running when the grace is over.

Example::

    supervisor = Supervisor(settings, store)
    await supervisor.start()
    ...
    await supervisor.stop(grace=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kolors_api.jobs import JobStore
from kolors_api.settings import Settings
from kolors_api.worker.messages import Changed, Fatal, Hello, JobDone, Ready, decode, encode

log = logging.getLogger("kolors_api.worker")

#: Restart backoff of an engine process that died, in seconds: first, doubling up to the cap; back to
#: the first once one ran `HEALTHY_SECONDS`.
RESTART_FIRST, RESTART_CAP, HEALTHY_SECONDS = 1.0, 30.0, 60.0


class DeviceError(ValueError):
    """`--device` names no device that an engine process could run on."""


def engine_devices(spec: str | None) -> list[str | None]:
    """The devices of `--device`, one engine process each (`kolors_api.preflight.devices`: a device,
    a list with repeats allowed such as `cpu,cpu`, or `all`); unset: one, on the engine's own choice
    (CUDA when there is one). `DeviceError` names what is wrong."""
    from kolors_api.preflight import Refused, devices

    try:
        return list(devices(spec)) or [None]
    except Refused as exc:
        raise DeviceError(str(exc)) from None


def exit_cause(returncode: int, fatal: str | None) -> str:
    """`killed by SIGKILL` (`, the OOM killer's signal`), `exit code 1: OSError: …`."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the OOM killer's signal, or kill -9)" if name == "SIGKILL" else \
            " (a crash in native code)" if name in ("SIGSEGV", "SIGABRT", "SIGBUS") else ""
        return f"killed by {name}{hint}"
    return f"exit code {returncode}" + (f": {fatal}" if fatal else "")


@dataclass
class Engine:
    """One engine process's slot: what it runs on and how it is doing."""

    index: int
    device: str | None
    state: str = "starting"  # starting, ready, restarting, stopped
    pid: int | None = None
    worker_id: str | None = None
    restarts: int = 0
    last_exit: str | None = None
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "device": self.device or "auto", "state": self.state, "pid": self.pid,
                "worker_id": self.worker_id, "restarts": self.restarts, "last_exit": self.last_exit}


class Supervisor:
    """Starts one engine process per device of `settings.device` on `store`, restarts those that die,
    relays the store's wake-ups both ways, and hands each `JobDone` to `on_done`."""

    def __init__(self, settings: Settings, store: JobStore, *,
                 on_done: Callable[[int, JobDone], None] | None = None,
                 devices: list[str | None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.on_done = on_done
        self.engines = [Engine(i, d) for i, d in enumerate(devices or engine_devices(settings.device))]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    # -- what the API shows
    @property
    def ready(self) -> int:
        """How many engine processes are ready (their engine loaded)."""
        return sum(engine.state == "ready" for engine in self.engines)

    def problem(self) -> str:
        """Why no engine is ready, for `/readyz`."""
        dead = [e for e in self.engines if e.last_exit and e.state != "ready"]
        if dead:
            e = dead[0]
            return f"engine process {e.index} ({e.device or 'auto'}) {e.state}: it exited ({e.last_exit})"
        return "the engine is loading"

    # -- life
    async def start(self) -> None:
        self.store.relay(self._broadcast)
        self._tasks = [asyncio.create_task(self._keep(engine)) for engine in self.engines]

    def drain(self) -> None:
        """Stop claiming (SIGTERM to every engine process: the job in hand finishes); see `stop`."""
        self._stopping.set()
        for engine in self.engines:
            proc = engine.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    async def drained(self) -> None:
        """Return once `drain` was called (a signal, in `kolors-api worker`)."""
        await self._stopping.wait()

    async def stop(self, grace: float) -> None:
        """Drain, wait up to `grace` seconds for the engine processes to end, then kill the rest."""
        self.drain()
        _, pending = await asyncio.wait(self._tasks, timeout=max(0.0, grace)) if self._tasks else (set(), set())
        for engine in self.engines:
            proc = engine.proc
            if proc is not None and proc.returncode is None:
                log.warning("engine process %d (pid %s) still running at the end of the shutdown grace: killed; "
                            "its job goes back to the queue", engine.index, engine.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=10)
        for task in self._tasks:
            task.cancel()
        self.store.relay(None)

    def _broadcast(self, job_id: str | None, progress: bool = False) -> None:
        line = encode(Changed(job_id, progress))
        for engine in self.engines:
            writer = engine.writer
            if writer is not None and not writer.is_closing():
                writer.write(line)

    async def _keep(self, engine: Engine) -> None:
        delay = RESTART_FIRST
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                cause = await self._run_once(engine)
            except Exception as exc:  # could not even spawn it: same backoff
                cause = f"could not start: {type(exc).__name__}: {exc}"
            engine.state, engine.last_exit, engine.proc, engine.writer = "restarting", cause, None, None
            if engine.worker_id is not None:
                with contextlib.suppress(Exception):
                    await self.store.worker_alive(engine.worker_id, 0)  # no longer counted as alive
            if self._stopping.is_set():
                break
            if time.monotonic() - started >= HEALTHY_SECONDS:
                delay = RESTART_FIRST
            engine.restarts += 1
            log.error("engine process %d (%s, pid %s) exited: %s; starting it again in %g s (restart %d)",
                      engine.index, engine.device or "auto", engine.pid, cause, delay, engine.restarts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, RESTART_CAP)
        engine.state = "stopped"

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        on_cpu = sum(1 for e in self.engines if e.device == "cpu")
        if on_cpu > 1 and "OMP_NUM_THREADS" not in env:
            # CPU engines share the cores rather than each taking all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // on_cpu))
        return env

    async def _run_once(self, engine: Engine) -> str:
        """Run one engine process to its end; return how it ended."""
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kolors_api.worker.process", "--fd", str(theirs.fileno()),
                "--index", str(engine.index), stdin=asyncio.subprocess.PIPE, pass_fds=(theirs.fileno(),),
                start_new_session=True, env=self._child_env())
        finally:
            theirs.close()
        engine.proc, engine.pid, engine.state = proc, proc.pid, "starting"
        settings = self.settings.model_copy(update={"device": engine.device})
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(settings.model_dump(mode="json")).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        reader, engine.writer = await asyncio.open_unix_connection(sock=ours)
        fatal: str | None = None
        while line := await reader.readline():
            try:
                message = decode(line)
            except (ValueError, TypeError):
                continue
            if isinstance(message, Changed):
                self.store.changed(message.job_id, message.progress)
            elif isinstance(message, JobDone):
                if self.on_done is not None:
                    self.on_done(proc.pid, message)
            elif isinstance(message, Hello):
                engine.worker_id = message.worker_id
            elif isinstance(message, Ready):
                engine.state = "ready"
                log.info("engine process %d (%s, pid %d) is ready", engine.index, engine.device or "auto", proc.pid)
            elif isinstance(message, Fatal):
                fatal = message.cause
        engine.writer.close()
        returncode = await proc.wait()
        return exit_cause(returncode, fatal)
