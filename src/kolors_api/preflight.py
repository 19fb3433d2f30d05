"""Start-up checks of `serve` and `worker`, all made before anything is printed or bound.

Each refusal is one line on stderr and exit status 2, never a traceback after the server said it was
ready: a worker on the embedded store (it could never get another process's job), a store that cannot
be reached, a device that is not one or is not here, a missing extra. Nothing here imports torch: the
API process never does, and the device is checked through torch's metadata and the CUDA driver.

Example::

    if (code := preflight.refuse(settings, "serve")) is not None:
        return code
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kolors_api.settings import Settings

#: The modules an engine process imports, by the extra that brings them (torch is installed apart).
WORKER_MODULES = ("pydantic", "pydantic_settings", "diffusers", "transformers", "sentencepiece", "accelerate",
                  "PIL", "numpy")
SERVER_MODULES = ("fastapi", "uvicorn", "starlette", "pydantic", "pydantic_settings", "prometheus_client",
                  "limits", "standardwebhooks")
#: One device: cpu, cuda, cuda:N, mps.
DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?|mps")
#: How long the store may take to answer its first ping at start-up, in seconds.
STORE_TIMEOUT = 3.0


class Refused(Exception):
    """A start-up refusal; its text is the one line printed (after `kolors-api: `)."""


def _missing(modules: tuple[str, ...]) -> str | None:
    """The first of `modules` that cannot be imported here (found without importing it), else None."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def need_server() -> None:
    """`serve` needs the `server` extra."""
    if (name := _missing(SERVER_MODULES)) is not None:
        raise Refused(f"serve needs the `server` extra, which is not installed (module {name!r} is missing): "
                      f"pip install -e '.[server]' in the checkout")


def need_worker(command: str) -> None:
    """An engine process (`worker`, or `serve` with its worker) needs torch and the `worker` extra."""
    if _missing(("torch",)) is not None:
        raise Refused("torch is not installed; install it first (pip install torch==2.13.0, or the CUDA build "
                      "for your driver), then pip install -e '.[worker]'")
    if (name := _missing(WORKER_MODULES)) is not None:
        who = "worker" if command == "worker" else "serve's in-process worker"
        alt = "" if command == "worker" else ", or run serve --no-worker (an API without a worker)"
        raise Refused(f"{who} needs the `worker` extra, which is not installed (module {name!r} is missing): "
                      f"pip install -e '.[worker]' in the checkout{alt}")


def devices(spec: str | None) -> list[str]:
    """`cuda:0,cuda:1` -> ["cuda:0", "cuda:1"]; `all` -> every CUDA device here, else ["cpu"]; None ->
    [] (the engine picks). `Refused` for anything that is not a device or not here."""
    if spec is None or not spec.strip():
        return []
    if spec.strip() == "all":
        count = cuda_devices()
        return [f"cuda:{n}" for n in range(count)] if count else ["cpu"]
    names = [part.strip() for part in spec.split(",")]
    for name in names:
        if not DEVICE.fullmatch(name):
            raise Refused(f"--device {spec[:60]!r}: expected cpu, cuda, cuda:N (or mps), a comma-separated list "
                          f"of them (cuda:0,cuda:1), or all")
    for name in names:
        if name.startswith("cuda"):
            _check_cuda(name)
    return names


def _check_cuda(name: str) -> None:
    build = torch_cuda_build()
    if build is None:
        version = _torch_version()
        raise Refused(f"device {name}: this torch ({version}) is a build without CUDA; install the CUDA build "
                      f"of torch for your driver, or pass --device cpu")
    count = cuda_devices()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if count == 0:
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise Refused(f"device {name}: no CUDA device is visible here{where}; check the driver (nvidia-smi), "
                      f"or pass --device cpu")
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise Refused(f"device {name}: there {'is' if count == 1 else 'are'} {count} CUDA device"
                      f"{'' if count == 1 else 's'} here (cuda:0..cuda:{count - 1})")


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built for (from `torch/version.py`, without importing torch), or None."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return None
    found = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else None


def cuda_devices() -> int:
    """CUDA devices visible to this process (the driver's count; honours CUDA_VISIBLE_DEVICES), 0 without
    a driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def check_store(settings: Settings, command: str) -> None:
    """A worker needs the fleet's store; a fleet store must answer a ping now."""
    if command == "worker" and not settings.fleet:
        raise Refused("worker needs --store redis://HOST:PORT/DB (env KOLORS_API_STORE): a worker on the "
                      "embedded SQLite store never gets a job from another process; `serve` runs its own")
    if not settings.fleet:
        _check_schema(settings.sqlite_path())
        return
    from redis import Redis  # the `redis` extra; a missing one is named by the caller

    url = re.sub(r"//[^@/]*@", "//***@", settings.store)
    client = Redis.from_url(settings.store, socket_connect_timeout=STORE_TIMEOUT, socket_timeout=STORE_TIMEOUT)
    try:
        client.ping()
    except Exception as exc:
        raise Refused(f"store {url} cannot be reached ({type(exc).__name__}: {str(exc)[:200]}); start Redis "
                      f"there or fix --store (env KOLORS_API_STORE)") from None
    finally:
        client.close()


def _check_schema(path: Path) -> None:
    """An embedded database made by a newer kolors-api (a downgrade) is refused, untouched."""
    import sqlite3

    from kolors_api.jobs.sqlite_schema import VERSION, file_version

    try:
        at = file_version(path)
    except sqlite3.Error as exc:
        raise Refused(f"{path} is not a database kolors-api can open ({exc}); move it away or point --data-dir "
                      "elsewhere") from None
    if at is not None and at > VERSION:
        raise Refused(f"{path} has schema version {at}, newer than this kolors-api knows ({VERSION}): run the "
                      "kolors-api that made it, or a newer one")


def warnings(settings: Settings, command: str) -> list[str]:
    """Settings that do nothing as given: said at start, not refused."""
    said = []
    blobs = settings.blobs_url() or ""
    if command == "serve" and settings.blob_redirect and not blobs.startswith("s3://"):
        said.append("KOLORS_API_BLOB_REDIRECT is on but the blob URL is not s3:// (it is "
                    f"{blobs or 'unset'}); output URLs stream the images through the API")
    return said


def refuse(command: str, make_settings: Callable[[], Settings]) -> int | None:
    """Every check of `command` (`serve` or `worker`) on the settings `make_settings` builds (once the
    extras they need are known to be there): None when it may start (after printing any warning),
    else exit status 2 after one line on stderr."""
    try:
        if command == "serve":
            need_server()
        else:
            need_worker(command)
        settings = make_settings()
        worker = command == "worker" or settings.worker
        if command == "serve" and worker:
            need_worker(command)
        check_store(settings, command)
        if worker:
            devices(settings.device)
    except Refused as exc:
        print(f"kolors-api: {exc}", file=sys.stderr)
        return 2
    for line in warnings(settings, command):
        print(f"kolors-api: warning: {line}", file=sys.stderr)
    return None
