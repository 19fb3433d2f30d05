"""The OpenAI image edits API: `POST /v1/images/edits` (multipart), mapped onto `kolors-img2img`.

Fields: `image` (or `image[]`, one picture), `prompt`, `n`, `size` ("WxH" or "auto": the picture's
aspect ratio), `response_format`, `output_format`, `output_compression`, and the Kolors parameters a
caller may add (`negative_prompt`, `cfg`, `seed`, `steps`, `scheduler`, `strength`); `model`,
`quality`, `user`, `background`, `input_fidelity` and `moderation` are accepted and change nothing.
`mask` (inpainting) is a 400 for now. Errors are in OpenAI's shape (`app.error_json`).

The multipart body is read whole, within the route's limit, and parsed with the standard library's
MIME parser (no extra dependency); the picture then goes through the same intake as every picture.
"""

from __future__ import annotations

import base64
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from kolors_api.api.deps import CallerKey, ServiceDep, read_body
from kolors_api.api.models import IDEMPOTENCY_KEY, ImagesResponse, OpenAIErrorBody, errors
from kolors_api.api.openai_images import FORMATS, SIZE, openai_answer
from kolors_api.errors import BadRequest
from kolors_api.schema import IMG2IMG, SCHEDULERS, short, unknown_fields

router = APIRouter()

EDITS_PATH = "/v1/images/edits"
#: Text fields and how they become `kolors-img2img` fields (name, type).
TEXT_FIELDS: dict[str, tuple[str, type]] = {
    "prompt": ("prompt", str), "n": ("number_of_images", int), "negative_prompt": ("negative_prompt", str),
    "cfg": ("cfg", float), "seed": ("seed", int), "steps": ("steps", int), "scheduler": ("scheduler", str),
    "strength": ("strength", float), "output_compression": ("output_quality", int),
}
IGNORED = frozenset({"model", "quality", "user", "background", "input_fidelity", "moderation", "stream",
                     "partial_images"})
EDITS_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The picture to start from (PNG, JPEG "
                  "or WebP; `image[]` is taken too, one picture)."},
        "prompt": {"type": "string"}, "n": {"type": "integer", "minimum": 1, "maximum": 10},
        "size": {"type": "string", "examples": ["1024x1024", "auto"]},
        "response_format": {"type": "string", "enum": ["b64_json", "url"]},
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
        "output_compression": {"type": "integer", "minimum": 0, "maximum": 100},
        "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.75},
        "negative_prompt": {"type": "string"}, "cfg": {"type": "number"}, "seed": {"type": "integer"},
        "steps": {"type": "integer"}, "scheduler": {"type": "string", "enum": list(SCHEDULERS)},
        "mask": {"type": "string", "format": "binary", "description": "not supported yet: a 400"},
    }}}}}, "parameters": [IDEMPOTENCY_KEY]}


def parts(content_type: str, body: bytes) -> list[tuple[str, Any]]:
    """The (name, part) of a multipart/form-data body, in order."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise BadRequest("body: must be multipart/form-data (image, prompt, …)")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") +
                                                  b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadRequest("body: not a valid multipart/form-data body")
    out: list[tuple[str, Any]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            out.append((name, part))
    return out


def text_of(part: Message) -> str:
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{part.get_param('name', header='content-disposition')}: must be UTF-8 text") from None


def to_img2img(fields: list[tuple[str, Any]]) -> tuple[dict[str, Any], str]:
    """The form → a `kolors-img2img` body (whose own validation checks the ranges), and the response format."""
    body: dict[str, Any] = {}
    pictures: list[bytes] = []
    unknown: list[str] = []
    response_format, size = "b64_json", "auto"
    for name, part in fields:
        if name in ("image", "image[]"):
            payload = part.get_payload(decode=True)
            pictures.append(payload if isinstance(payload, bytes) else b"")
        elif name in ("mask", "mask[]"):
            raise BadRequest("mask: not supported yet (inpainting comes later); send the image without a mask")
        elif name in TEXT_FIELDS:
            field, kind = TEXT_FIELDS[name]
            text = text_of(part)
            try:
                body[field] = kind(text)
            except ValueError:
                raise BadRequest(f"{name}: must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {short(text)}") from None
        elif name == "size":
            size = text_of(part)
        elif name == "response_format":
            response_format = text_of(part)
            if response_format not in ("b64_json", "url"):
                raise BadRequest(f"response_format: must be b64_json or url, got {short(response_format)}")
        elif name == "output_format":
            fmt = text_of(part)
            if fmt not in FORMATS:
                raise BadRequest(f"output_format: must be png, jpeg or webp, got {short(fmt)}")
            body["output_format"] = FORMATS[fmt]
        elif name not in IGNORED:
            unknown.append(name)
    if unknown:
        raise unknown_fields(unknown)
    if not pictures:
        raise BadRequest("image: is required (a PNG, JPEG or WebP file)")
    if len(pictures) > 1:
        raise BadRequest(f"image: one picture is taken, got {len(pictures)}")
    body["image"] = base64.b64encode(pictures[0]).decode()
    if "prompt" not in body:
        raise BadRequest("prompt: is required")
    if size != "auto":
        match = SIZE.fullmatch(size)
        if match is None:
            raise BadRequest(f"size: must look like \"1024x1024\" or be \"auto\", got {short(size)}")
        body["width"], body["height"] = int(match[1]), int(match[2])
    body.setdefault("output_format", "png")
    return body, response_format


@router.post(EDITS_PATH, summary="OpenAI Images API: edit (image to image)", openapi_extra=EDITS_FORM,
             response_model=ImagesResponse,
             responses=errors(400, 401, 403, 406, 413, 422, 429, 503, 504, body=OpenAIErrorBody))
async def images_edits(request: Request, svc: ServiceDep, key: CallerKey) -> Response:
    raw = await read_body(request, svc.body_limit(IMG2IMG))
    body, response_format = to_img2img(parts(request.headers.get("content-type", ""), raw))
    return openai_answer(svc, request, await svc.run_sync(request, key, IMG2IMG, body), response_format)
