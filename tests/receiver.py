"""A real webhook receiver on loopback for the tests: records every POST, answers from a script."""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int
    at: float = 0.0  # time.time() when it came in


@dataclass
class Receiver:
    """`statuses` are answered in turn (the last one from then on); a status 0 is no answer at all: the
    request hangs until `close()` or until the client closes the connection (a receiver that never
    answers); `hanging` counts such requests open right now."""

    statuses: list[int] = field(default_factory=lambda: [200])
    posts: list[Received] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    #: Requests hanging right now (status 0), and the most there ever were at once.
    hanging: int = 0
    most_hanging: int = 0

    def __post_init__(self) -> None:
        receiver = self
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                n = len(receiver.posts)
                status = receiver.statuses[min(n, len(receiver.statuses) - 1)]
                receiver.posts.append(Received(dict(self.headers.items()), body, status, time.time()))
                if status == 0:
                    with receiver.lock:
                        receiver.hanging += 1
                        receiver.most_hanging = max(receiver.most_hanging, receiver.hanging)
                    # hang until released, or until the client gives up and closes the connection
                    deadline = time.monotonic() + 120
                    while not receiver.released.wait(0.05) and time.monotonic() < deadline:
                        if select.select([self.connection], [], [], 0)[0] and not self.connection.recv(
                                1, socket.MSG_PEEK):
                            break
                    with receiver.lock:
                        receiver.hanging -= 1
                    return
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        # shutdown() waits for the serve loop to look again: every 50 ms, not the default 0.5 s
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait_for(self, n: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.posts) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.posts) >= n, f"{len(self.posts)} deliveries, wanted {n}"
        return self.posts

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


class Tripwire:
    """A listening socket at an address the guard must never dial: `connected()` says if anyone did."""

    def __init__(self, host: str, family: socket.AddressFamily = socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])

    def connected(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    def close(self) -> None:
        self.sock.close()
