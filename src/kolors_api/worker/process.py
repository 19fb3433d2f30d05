"""The engine process: one per device, started and watched by `serve` and `kolors-api worker`
(`kolors_api.worker.supervisor`); never started by hand.

    python -m kolors_api.worker.process --fd FD --index N [--device DEVICE]   (settings JSON on stdin)

It opens the store itself (SQLite in WAL mode, or Redis), loads the engine and runs the worker
loop: claim ▸ run ▸ encode ▸ screen ▸ store ▸ ack. Its supervisor hears over the socket `FD`
(`kolors_api.worker.messages`) which jobs it changed, when it is ready and what each job cost, and
tells it when a job was queued. SIGTERM drains it: the job in hand finishes, nothing more is claimed.
When its supervisor goes away (the socket closes, or the kernel's parent-death signal), it exits at
once: the job in hand goes back to the queue through its lease (or the next `serve`'s recovery).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from kolors_api import logs
from kolors_api.jobs import JobStore, make_store
from kolors_api.logs import FORMAT
from kolors_api.settings import Settings
from kolors_api.worker.messages import Changed, Fatal, Hello, JobDone, Message, Ready, decode, encode
from kolors_api.worker.metrics import engine_report

log = logging.getLogger("kolors_api.worker")

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a SIGKILLed `serve` leaves no engine behind)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_id(device: str | None) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{device or 'auto'}"


class Channel:
    """This process's end of the socket to its supervisor: lines out, `Changed` in."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def send(self, message: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))

    async def listen(self, reader: asyncio.StreamReader, store: JobStore) -> None:
        """Pass the supervisor's news to the store until it goes away; then leave at once."""
        while line := await reader.readline():
            with contextlib.suppress(ValueError, TypeError):
                message = decode(line)
                if isinstance(message, Changed):
                    store.changed(message.job_id, message.progress)
        log.warning("engine process %d: its supervisor is gone; leaving", os.getpid())
        logging.shutdown()
        os._exit(0)


async def run(settings: Settings, sock: socket.socket) -> int:
    from kolors_api.worker.make import make_worker

    reader, writer = await asyncio.open_unix_connection(sock=sock)
    channel = Channel(writer)
    store = make_store(settings)
    me = worker_id(settings.device)

    def done(seconds: float, outcome: str, stages: dict[str, float]) -> None:
        channel.send(JobDone(seconds, outcome, stages, engine_report()))

    worker = make_worker(settings, store, on_job_done=done, worker_id=me)
    relay: Callable[[str | None, bool], None] = lambda job_id, progress: channel.send(Changed(job_id, progress))  # noqa: E731
    store.relay(relay)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not worker.loaded.is_set():  # nothing in hand while the engine loads: no reason to wait for it
            log.info("engine process %d: stopped while loading", os.getpid())
            logging.shutdown()
            os._exit(0)
        worker.stop()

    loop.add_signal_handler(signal.SIGTERM, stop)
    await store.open()
    listening = asyncio.create_task(channel.listen(reader, store))
    channel.send(Hello(me, os.getpid(), settings.device or "auto"))
    running = asyncio.create_task(worker.run())
    loaded = asyncio.create_task(worker.loaded.wait())
    await asyncio.wait({running, loaded}, return_when=asyncio.FIRST_COMPLETED)
    if loaded.done():
        channel.send(Ready())
    try:
        await running
    except Exception as exc:
        log.error("engine process %d: the worker stopped on an error", os.getpid(), exc_info=exc)
        channel.send(Fatal(f"{type(exc).__name__}: {exc}"))
        return 1
    finally:
        loaded.cancel()
        listening.cancel()
        with contextlib.suppress(Exception):
            await store.close()
        with contextlib.suppress(Exception):
            await writer.drain()
            writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolors_api.worker.process")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent()
    # Ctrl+C reaches the whole foreground group: the supervisor decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings(**json.loads(sys.stdin.read()))
    logs.configure(settings.log_level, FORMAT.replace("%(asctime)s", f"%(asctime)s [engine {args.index}]"))
    sock = socket.socket(fileno=args.fd)
    try:
        return asyncio.run(run(settings, sock))
    except Exception as exc:  # the store or the worker could not even be built: say why, then exit
        log.error("engine process %d could not start", os.getpid(), exc_info=exc)
        with contextlib.suppress(OSError):
            sock.sendall(encode(Fatal(f"{type(exc).__name__}: {exc}")))
        return 1


if __name__ == "__main__":
    sys.exit(main())
