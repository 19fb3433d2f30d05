"""Encode a generated image as webp, jpg or png bytes (deterministic: same image, same bytes)."""

from __future__ import annotations

import io

from PIL import Image

_PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    """`fmt` is one of schema.OUTPUT_FORMATS; `quality` (0..100) applies to webp and jpg, png is lossless."""
    if fmt not in _PIL_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(_PIL_FORMATS)}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=_PIL_FORMATS[fmt], quality=int(quality))
    return buf.getvalue()
