"""`kolors-api generate`: make an image through a running server, with a progress bar.

Examples::

    kolors-api generate "a red fox in the snow"                  # -> kolors-<seed>.webp
    kolors-api generate "a red fox" -o fox.png --steps 30        # the format follows the suffix
    kolors-api generate "a red fox" -n 3 -o fox.webp             # -> fox-0.webp fox-1.webp fox-2.webp
    kolors-api generate "a red fox" --open                       # and open it in the image viewer
    kolors-api generate "a watercolour" --image photo.jpg --strength 0.6    # image to image
    kolors-api generate "a red fox" --ip-adapter-image ref.png    # a reference (server with --ip-adapter)

The server is env `KOLORS_API_BASE_URL` (default http://127.0.0.1:8000) or `--base-url`; the key
env `KOLORS_API_KEY` or `--api-key`. The request goes through v2 (submit, then follow the job's
event stream for the progress bar, polling its status if the stream breaks), so a long generation
never meets a sync deadline. Prints one line per
file written, `PATH  seed=SEED`, on stdout; errors go to stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import webbrowser
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from kolors_api.client import APIError, AsyncJob, Client, Event, InferenceFailed, KolorsAPIError
from kolors_api.schema import GenerateParams

log = logging.getLogger("kolors_api.cli")

MODEL = "kolors"
IMG2IMG = "kolors-img2img"
#: The flags that are request parameters: (flags, argparse dest, type); the rest steer the command.
PARAM_FLAGS: tuple[tuple[tuple[str, ...], str, type], ...] = (
    (("--negative-prompt",), "negative_prompt", str),
    (("--steps",), "steps", int),
    (("--cfg",), "cfg", float),
    (("--seed",), "seed", int),
    (("--width",), "width", int),
    (("--height",), "height", int),
    (("--scheduler",), "scheduler", str),
    (("--quality",), "output_quality", int),
    (("-n", "--number-of-images"), "number_of_images", int),
    (("--image",), "image", str),
    (("--strength",), "strength", float),
    (("--ip-adapter-image",), "ip_adapter_image", str),
    (("--ip-adapter-scale",), "ip_adapter_scale", float),
)
#: What the picture flags say in --help (they are no `GenerateParams` defaults).
PICTURE_HELP = {
    "image": "PATH|URL: the picture to start from; runs kolors-img2img",
    "strength": "with --image: how much is redrawn, 0 < S <= 1 (server default 0.75)",
    "ip_adapter_image": "PATH|URL: a reference picture (a server started with --ip-adapter)",
    "ip_adapter_scale": "with --ip-adapter-image: 0..1 (server default 0.5)",
}
PARAMS = (*(dest for _, dest, _ in PARAM_FLAGS), "output_format")
SUFFIX_FORMATS = {".webp": "webp", ".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
POLL_INTERVAL_S = 0.25

StatusHook = Callable[[dict[str, Any]], None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kolors-api generate` (the CLI's one definition of them)."""
    parser.add_argument("prompt", help="the prompt (request parameter prompt)")
    parser.add_argument("-o", "--output", default=None, help="output file (default kolors-<seed>.<format>)")
    for flags, dest, kind in PARAM_FLAGS:
        if dest in PICTURE_HELP:
            parser.add_argument(*flags, dest=dest, type=kind, help=f"request parameter {dest}: {PICTURE_HELP[dest]}")
            continue
        default = "random" if dest == "seed" else getattr(GenerateParams, dest) or "empty"
        parser.add_argument(*flags, dest=dest, type=kind, help=f"request parameter {dest} (server default {default})")
    parser.add_argument("--format", dest="output_format", choices=("webp", "jpg", "png"),
                        help="request parameter output_format (default: from -o's suffix, else webp)")
    parser.add_argument("--base-url", dest="base_url", default=None,
                        help="server URL (env KOLORS_API_BASE_URL, default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", dest="api_key", default=None, help="API key (env KOLORS_API_KEY; no default)")
    parser.add_argument("--no-progress", dest="no_progress", action="store_true",
                        help="no progress bar (default: a bar on a terminal)")
    parser.add_argument("--open", dest="open", action="store_true",
                        help="open the written image(s) with the desktop's viewer (env BROWSER picks the program)")


def generate(args: argparse.Namespace) -> int:
    """Run `kolors-api generate`; returns the exit status (0 written, 1 failed, 130 interrupted)."""
    params: dict[str, Any] = {"prompt": args.prompt}
    params |= {name: getattr(args, name) for name in PARAMS if getattr(args, name, None) is not None}
    output = Path(args.output) if args.output else None
    suffix_format = SUFFIX_FORMATS.get(output.suffix.lower()) if output is not None else None
    if suffix_format is not None:
        if params.setdefault("output_format", suffix_format) != suffix_format:
            print(f"error: -o {output} does not match --format {params['output_format']}", file=sys.stderr)
            return 2

    if not (args.api_key or os.environ.get("KOLORS_API_KEY")):
        # Said before any request: the server's 401 names the HTTP header, not what to do here.
        print("error: no API key: set KOLORS_API_KEY or pass --api-key", file=sys.stderr)
        return 2
    client = Client(api_key=args.api_key, base_url=args.base_url)
    job = None
    try:
        with client:
            # a picture to start from makes it image to image; paths go as base64, URLs as they are
            job = client.submit_async(IMG2IMG if "image" in params else MODEL, **params)
            with _progress(enabled=not args.no_progress) as on_status:
                result = follow(job, on_status)
            urls = result.get("output") or []
            images = client.images(result)
    except InferenceFailed as exc:
        return _fail(f"generation failed: {exc.detail or 'unknown error'}")
    except APIError as exc:
        return _fail(f"{exc.detail} (HTTP {exc.status})")
    except KolorsAPIError as exc:
        return _fail(str(exc.detail))
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach {client.base_url}: {exc or type(exc).__name__}")
    except KeyboardInterrupt:
        if job is not None:
            print(f"interrupted; request {job.request_id} goes on: {job.response_url}", file=sys.stderr)
        return 130

    seeds = [int(s) for s in result.get("seeds") or []]
    written: list[Path] = []
    try:
        for i, (url, data) in enumerate(zip(urls, images, strict=True)):
            seed = seeds[i] if i < len(seeds) else None
            path = _path_for(output, i, len(images), seed, _ext(url, params))
            path.write_bytes(data)
            written.append(path)
            print(f"{path}  seed={seed if seed is not None else '?'}")
    except OSError as exc:
        return _fail(f"cannot write the image: {exc}")
    if args.open:
        return _open(written)
    return 0


def _open(paths: list[Path]) -> int:
    """Open each file with the desktop's handler (webbrowser: $BROWSER, xdg-open, open, start)."""
    for path in paths:
        if not webbrowser.open(path.resolve().as_uri()):
            return _fail(f"no program to open {path} with (set BROWSER, or install xdg-utils)")
    return 0


def follow(job: AsyncJob, on_status: StatusHook | None) -> dict[str, Any]:
    """Wait for the job's result, the bar driven by its event stream; if the stream breaks (or the
    server has none), by polling its status instead. Raises `InferenceFailed` when it failed."""
    try:
        for event in job.events():
            if event.event == "failed":
                raise InferenceFailed(event.data.get("error"), event.data)
            if on_status is not None:
                on_status(_as_status(event))
            if event.event == "completed":
                return event.data
    except (httpx.HTTPError, KolorsAPIError) as exc:
        if isinstance(exc, InferenceFailed):
            raise
        log.info("event stream of %s broke (%s); polling instead", job.request_id, exc)
    return job.wait(timeout=math.inf, interval=POLL_INTERVAL_S, on_status=on_status)


def _as_status(event: Event) -> dict[str, Any]:
    """An event as the status body it stands for (what the bar is drawn from)."""
    if event.event in ("started", "progress"):
        return {"status": "PROCESSING", "progress": {"step": event.data.get("step", 0),
                                                     "total_steps": event.data.get("total_steps"),
                                                     "phase": event.data.get("phase")}}
    return event.data


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _ext(url: str, params: dict[str, Any]) -> str:
    """The format of an output, read from its URL (`.../outputs/0.webp`)."""
    name = httpx.URL(url).path.rsplit("/", 1)[-1]
    _, dot, ext = name.rpartition(".")
    return ext if dot and ext else str(params.get("output_format", "webp"))


def _path_for(output: Path | None, index: int, count: int, seed: int | None, ext: str) -> Path:
    """`-o out.webp` for one image, `out-0.webp`, `out-1.webp`... for more; else `kolors-<seed>.<ext>`."""
    if output is None:
        return Path(f"kolors-{seed if seed is not None else index}.{ext}")
    if not output.suffix:
        output = output.with_name(f"{output.name}.{ext}")
    if count == 1:
        return output
    return output.with_name(f"{output.stem}-{index}{output.suffix}")


@contextmanager
def _progress(*, enabled: bool) -> Iterator[StatusHook | None]:
    """A rich progress bar on stderr driven by status bodies; nothing when disabled or rich is absent."""
    if not enabled:
        yield None
        return
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:  # the client-only install has no rich: no bar, same result
        yield None
        return

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = progress.add_task("submitted", total=None)

    def on_status(body: dict[str, Any]) -> None:
        state = body.get("status")
        if state == "QUEUED":
            position = body.get("queue_position")  # 0-based on the wire: 0 is next in line
            progress.update(task, description=f"queued (position {position + 1})"
                            if isinstance(position, int) else "queued")
        elif state == "PROCESSING":
            info = body.get("progress") or {}
            total = info.get("total_steps") or None
            phase = info.get("phase")  # after the last step: decoding, encoding, storing
            progress.update(task, description=phase if phase and phase != "denoising" else "generating",
                            total=total, completed=info.get("step", 0))
        elif state == "COMPLETED":
            total = progress.tasks[0].total
            progress.update(task, description="done", completed=total or 0)

    with progress:
        yield on_status
