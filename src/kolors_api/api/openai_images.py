"""The OpenAI Images API: `POST /v1/images/generations`, mapped onto the `kolors` model."""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kolors_api.api.deps import CallerKey, Finished, JsonBody, Service, ServiceDep
from kolors_api.api.models import (
    IDEMPOTENCY_KEY,
    ImageGenerationRequest,
    ImagesResponse,
    OpenAIErrorBody,
    errors,
    parse_body,
    request_of,
)
from kolors_api.errors import BadRequest
from kolors_api.schema import MODEL, short

router = APIRouter()

#: Kolors parameters a caller may add beside the OpenAI ones.
PASSTHROUGH = ("negative_prompt", "cfg", "seed", "steps", "scheduler")
FORMATS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
OPENAI_PATH = "/v1/images/generations"
#: The OpenAI request field behind a `kolors` field an error names (the error's `param`).
OPENAI_PARAMS = {"number_of_images": "n", "width": "size", "height": "size", "output_quality": "output_compression"}


def to_kolors(req: ImageGenerationRequest) -> dict[str, Any]:
    """An OpenAI request → the `kolors` body (whose own validation checks the ranges)."""
    if req.stream:
        raise BadRequest("stream: streaming is not supported")
    out: dict[str, Any] = {"prompt": req.prompt}
    out |= {name: getattr(req, name) for name in PASSTHROUGH if getattr(req, name) is not None}
    if req.n is not None:
        out["number_of_images"] = req.n
    size = req.size or "1024x1024"
    if size != "auto":
        match = SIZE.fullmatch(size)
        if match is None:
            raise BadRequest(f"size: must look like \"1024x1024\", got {short(size)}")
        out["width"], out["height"] = int(match[1]), int(match[2])
    out["output_format"] = FORMATS[req.output_format or "png"]
    if req.output_compression is not None:
        out["output_quality"] = req.output_compression
    return out


@router.post(OPENAI_PATH, summary="OpenAI Images API: generate",
             openapi_extra={**request_of(ImageGenerationRequest), "parameters": [IDEMPOTENCY_KEY]},
             response_model=ImagesResponse,
             responses=errors(400, 401, 403, 406, 413, 422, 429, 503, 504, body=OpenAIErrorBody))
async def images_generations(request: Request, svc: ServiceDep, key: CallerKey, body: JsonBody) -> Response:
    req = parse_body(ImageGenerationRequest, body)
    return openai_answer(svc, request, await svc.run_sync(request, key, MODEL, to_kolors(req)), req.response_format)


def openai_answer(svc: Service, request: Request, done: Finished, response_format: str | None) -> JSONResponse:
    """OpenAI's images answer for a finished job: URLs or base64, as `response_format` asks."""
    job = done.job
    if response_format == "url":
        data = [{"url": url} for url in svc.output_urls(request, job)]
    else:
        data = [{"b64_json": b64} for b64 in done.b64()]
    return JSONResponse({"created": int(time.time()), "data": data,
                         "output_format": {"jpg": "jpeg"}.get(job.ext, job.ext)},
                        headers={"X-Request-Id": job.id})
