"""The OpenAI Images API: `POST /v1/images/generations`, mapped onto the `kolors` model."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kolors_api.api.app import read_json, service
from kolors_api.api.auth import authenticate
from kolors_api.api.generation import failed, outputs, wait_terminal
from kolors_api.errors import BadRequest
from kolors_api.jobs import JobState
from kolors_api.schema import MODEL

router = APIRouter()

#: OpenAI fields that do not change a Kolors image; accepted so OpenAI client code runs unchanged.
IGNORED = {"model", "quality", "style", "user", "background", "moderation"}
#: Kolors parameters a caller may add beside the OpenAI ones.
PASSTHROUGH = {"negative_prompt", "cfg", "seed", "steps", "scheduler"}
FORMATS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}


def to_kolors(body: Any) -> tuple[dict[str, Any], str]:
    """OpenAI body → (kolors body, response_format)."""
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    known = IGNORED | PASSTHROUGH | {"prompt", "n", "size", "response_format", "output_format",
                                     "output_compression", "stream"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"{', '.join(unknown)}: unknown field{'s' if len(unknown) > 1 else ''}")
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported")
    out: dict[str, Any] = {k: body[k] for k in PASSTHROUGH | {"prompt"} if k in body}
    if "n" in body and body["n"] is not None:
        out["number_of_images"] = body["n"]
    size = body.get("size") or "1024x1024"
    if size != "auto":
        w, sep, h = str(size).partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise BadRequest(f"size: must look like \"1024x1024\", got {size!r}")
        out["width"], out["height"] = int(w), int(h)
    fmt = body.get("output_format") or "png"
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise BadRequest(f"output_format: must be one of png, jpeg, webp, got {fmt!r}")
    out["output_format"] = FORMATS[fmt]
    if body.get("output_compression") is not None:
        out["output_quality"] = body["output_compression"]
    response_format = body.get("response_format") or "b64_json"
    if not isinstance(response_format, str) or response_format not in ("b64_json", "url"):
        raise BadRequest(f"response_format: must be b64_json or url, got {response_format!r}")
    return out, response_format


@router.post("/v1/images/generations", summary="OpenAI Images API: generate")
async def images_generations(request: Request) -> Response:
    svc = service(request)
    key = await authenticate(svc.store, request)
    kolors_body, response_format = to_kolors(await read_json(request, svc.settings.max_body_bytes))
    job = await svc.submit(request, key, MODEL, kolors_body, sync=True)
    job = await wait_terminal(svc, request, job)
    if job.state == JobState.FAILED:
        raise failed(job)
    if response_format == "url":
        data = [{"url": url} for url in svc.output_urls(request, job)]
    else:
        data = [{"b64_json": base64.b64encode(img).decode()} for img in await outputs(svc, job)]
    return JSONResponse({"created": int(time.time()), "data": data,
                         "output_format": {"jpg": "jpeg"}.get(job.ext, job.ext)},
                        headers={"X-Request-Id": job.id})
