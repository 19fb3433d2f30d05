"""Picture fields of a request (`image`, `ip_adapter_image`): what the client takes and sends.

A value may be a path (`str` naming an existing file, or `pathlib.Path`), `bytes`, a PIL image (or
anything with PIL's `save(fp, format=...)`), an http(s) URL or a data URI (sent as they are: the
server fetches URLs), or a base64 string (sent as it is). Files, bytes and PIL images go as base64.
No dependency beyond the standard library: PIL is only used when the caller passes a PIL image.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

#: The request fields that take a picture.
IMAGE_FIELDS = ("image", "ip_adapter_image")


def image_value(value: Any) -> Any:
    """`value` as the wire takes a picture (see the module docstring); anything else is returned as it is."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, os.PathLike):
        return base64.b64encode(Path(value).read_bytes()).decode()
    if isinstance(value, str):
        head = value[:8].lower()
        if head.startswith(("http://", "https://", "data:")):
            return value
        if len(value) < 4096 and _is_file(value):
            return base64.b64encode(Path(value).read_bytes()).decode()
        return value
    if callable(getattr(value, "save", None)):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    return value


def _is_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


def with_images(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with its picture fields in wire form."""
    return {name: image_value(value) if name in IMAGE_FIELDS else value for name, value in params.items()}
