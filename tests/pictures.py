"""Pictures for the image-input tests, and a real picture server on loopback that answers from a script."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def picture(width: int = 96, height: int = 80, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    """A deterministic picture with structure (a gradient and a few dots), encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)
    rgb[rng.integers(0, height, 20), rng.integers(0, width, 20)] = 255
    image = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(side: int = 10000) -> bytes:
    """A PNG of side×side pixels that takes a few KB: all black, one bit a pixel."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@dataclass
class Route:
    """What the server answers on a path: a status, a body, headers, and a delay before answering."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: Send the body without Content-Length (chunked), as a stream that may be long.
    chunked: bool = False


@dataclass
class PictureServer:
    """GET `path` answers `routes[path]` (404 otherwise); `hits` lists the paths asked for."""

    routes: dict[str, Route] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.hits.append(self.path)
                route = server.routes.get(self.path, Route(404, b"not here"))
                if route.delay:
                    server.released.wait(route.delay)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.chunked:
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    try:
                        for i in range(0, len(route.body), 65536):
                            chunk = route.body[i:i + 65536]
                            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass  # the client stopped reading (too large): fine
                    return
                self.send_header("content-length", str(len(route.body)))
                self.end_headers()
                try:
                    self.wfile.write(route.body)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn()` took (for the bounds the issue states: a refusal of local input in well under a second)."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
