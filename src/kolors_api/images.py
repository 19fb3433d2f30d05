"""Input pictures (the `image` and `ip_adapter_image` fields): how their bytes are opened, checked and fit.

The API opens every input once at submit (`open_image`: PNG, JPEG or WebP only, at most
`MAX_SIDE` and at least `MIN_SIDE` pixels per side, checked from the header before a pixel is
decoded, so a small file that claims 10000×10000 pixels is refused unread), and stores the bytes
as they came. The worker opens the same bytes with the same function, so both see the same
pixels: the first frame, EXIF orientation applied, RGB. `fit` makes the picture the size of the
output (cover, then centre-crop); `auto_size` is the output size when a request gives none.

Pillow only (no torch): the API process imports this module.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from kolors_api.errors import BadRequest

#: What Pillow may open: nothing else is even tried (`Image.open(formats=...)`).
FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SIDE = 4096
MIN_SIDE = 64
#: The output sizes a request may name (schema's width/height range).
MIN_OUT, MAX_OUT = 512, 2048


def header_size(data: bytes, field: str) -> tuple[Image.Image, int, int]:
    """The lazily opened picture and its size read from the header (no pixel decoded yet); a 400
    naming `field` for anything but PNG, JPEG or WebP within MIN_SIDE..MAX_SIDE."""
    try:
        with warnings.catch_warnings():
            # a header claiming a huge size is ours to refuse below, not Pillow's to warn about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise BadRequest(f"{field}: the image is more than {MAX_SIDE}x{MAX_SIDE} pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise BadRequest(f"{field}: not a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width > MAX_SIDE or height > MAX_SIDE:
        raise BadRequest(f"{field}: {width}x{height} is more than {MAX_SIDE}x{MAX_SIDE} pixels")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise BadRequest(f"{field}: {width}x{height} is less than {MIN_SIDE} pixels on a side")
    return image, width, height


def open_image(data: bytes, field: str = "image") -> Image.Image:
    """The picture `data` holds, as the engine sees it: first frame, EXIF orientation applied, RGB.
    A 400 naming `field` when it is not a picture we take (see the module docstring)."""
    image, _, _ = header_size(data, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
            upright = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise BadRequest(f"{field}: the image data is truncated or corrupt") from None
    if upright.mode == "RGB":
        return upright
    if upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info):
        # transparent parts on white, as a browser shows them on a white page
        rgba = upright.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return upright.convert("RGB")


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` resized to cover width×height (aspect kept), then centre-cropped to it exactly."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _round8(value: float) -> int:
    return max(MIN_OUT, min(MAX_OUT, int(round(value / 8)) * 8))


def auto_size(width: int, height: int, given_width: int | None = None,
              given_height: int | None = None) -> tuple[int, int]:
    """The output size of an input of width×height when the request names none (or one) of them:
    the input's aspect ratio at about its pixel count, each side within 512..2048, multiples of 8."""
    if given_width is not None and given_height is not None:
        return given_width, given_height
    if given_width is not None:
        return given_width, _round8(given_width * height / width)
    if given_height is not None:
        return _round8(given_height * width / height), given_height
    scale = 1.0
    if min(width, height) < MIN_OUT:
        scale = MIN_OUT / min(width, height)
    if max(width, height) * scale > MAX_OUT:
        scale = MAX_OUT / max(width, height)
    return _round8(width * scale), _round8(height * scale)
