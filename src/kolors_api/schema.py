"""The request parameters of the `kolors` model: names, ranges, defaults (DESIGN.md §2).

One table, `PARAMS`, drives the three things that need them: validation (`validate`), the defaults
of `GenerateParams`, and the JSON Schema that `GET /v1/models` serves (`json_schema`).

Both the API and the worker import this module; it has no heavy dependencies.
"""

from __future__ import annotations

import math
import random
import unicodedata
from dataclasses import dataclass, field, fields, replace
from typing import Any

from kolors_api.errors import BadRequest
from kolors_api.jobs.base import WEBHOOK_EVENTS

MODEL = "kolors"
#: Image-to-image (diffusers `KolorsImg2ImgPipeline`, the same weights): every `kolors` parameter
#: plus `image` and `strength` (DESIGN.md §2 "Images in").
IMG2IMG = "kolors-img2img"
MODELS = (MODEL, IMG2IMG)
#: The fields that take a picture (base64, a data URI or an http(s) URL; `kolors_api.api.intake`).
IMAGE_FIELDS = ("image", "ip_adapter_image")

SCHEDULERS = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverMultistepScheduler_SDE_karras",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
OUTPUT_FORMATS = ("webp", "jpg", "png")
CONTENT_TYPES = {"webp": "image/webp", "jpg": "image/jpeg", "png": "image/png"}
MAX_SEED = 2**32 - 1
#: Draws the seed of a request without one: a seed is no secret, and this costs no system call per submit.
_SEEDS = random.Random()  # noqa: S311
MAX_PROMPT = 2000


@dataclass(frozen=True)
class Param:
    """One request parameter: its JSON type, default and range, and how it reads in the schema."""

    name: str
    kind: str  # "string" | "number" | "integer" | "enum" | "image"
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    multiple_of: int | None = None
    max_length: int | None = None
    description: str = ""
    #: Extra keywords of the JSON Schema (where the wire takes more than the resolved value does).
    schema: dict[str, Any] = field(default_factory=dict)


#: The one table of the `kolors` parameters, in Segmind's order.
PARAMS: tuple[Param, ...] = (
    Param("prompt", "string", max_length=MAX_PROMPT, schema={"minLength": 1},
          description="What to draw; the text encoder sees at most 256 tokens."),
    Param("negative_prompt", "string", "", max_length=MAX_PROMPT),
    Param("cfg", "number", 6.0, 0, 20, description="Guidance scale."),
    Param("seed", "integer", -1, 0, MAX_SEED, schema={"minimum": -1},
          description="-1 or omitted: random; the seed used is returned."),
    Param("steps", "integer", 25, 1, 50),
    Param("width", "integer", 1024, 512, 2048, multiple_of=8),
    Param("height", "integer", 1024, 512, 2048, multiple_of=8),
    Param("number_of_images", "integer", 1, 1, 10, description="Image i uses seed+i."),
    Param("scheduler", "enum", SCHEDULERS[0], choices=SCHEDULERS),
    Param("output_format", "enum", "webp", choices=OUTPUT_FORMATS),
    Param("output_quality", "integer", 80, 0, 100, description="webp/jpg quality; png is lossless."),
)
BY_NAME = {p.name: p for p in PARAMS}
FIELDS = tuple(BY_NAME)

IMAGE_SCHEMA = {"type": "string", "contentMediaType": "image/*",
                "description": "A picture: base64, a data URI (data:image/png;base64,…) or an http(s) URL the "
                               "server fetches; PNG, JPEG or WebP, 64..4096 pixels a side, at most 10 MB."}
#: What `kolors-img2img` takes beside `PARAMS`.
IMG2IMG_PARAMS: tuple[Param, ...] = (
    Param("image", "image", description="The picture to start from; resized to cover width×height and "
          "centre-cropped (width/height omitted: the input's aspect ratio at about its pixel count)."),
    Param("strength", "number", 0.75, 0, 1, schema={"exclusiveMinimum": 0, "minimum": None},
          description="How much of the picture is redrawn; the steps run are int(steps × strength), at least 1."),
)
#: The IP-Adapter's fields, on every model, when the server runs one (`--ip-adapter`).
IP_ADAPTER_PARAMS: tuple[Param, ...] = (
    Param("ip_adapter_image", "image", description="A reference picture (IP-Adapter); needs a server "
          "started with --ip-adapter."),
    Param("ip_adapter_scale", "number", 0.5, 0, 1,
          description="How strongly the reference steers; 0 gives exactly the output without it."),
)
NO_IP_ADAPTER = "ip_adapter_image: this server has no IP-Adapter (start it with --ip-adapter)"


def params_of(model: str) -> tuple[Param, ...]:
    """The parameter table of a model slug (`kolors` or `kolors-img2img`), the IP-Adapter's included."""
    return PARAMS + (IMG2IMG_PARAMS if model == IMG2IMG else ()) + IP_ADAPTER_PARAMS


def _default(name: str) -> Any:
    return field(default=BY_NAME[name].default)


@dataclass(frozen=True)
class GenerateParams:
    """One validated request; `seed` is always resolved (never -1). Defaults come from `PARAMS`."""

    prompt: str
    negative_prompt: str = _default("negative_prompt")
    cfg: float = _default("cfg")
    seed: int = 0
    steps: int = _default("steps")
    width: int = _default("width")
    height: int = _default("height")
    number_of_images: int = _default("number_of_images")
    scheduler: str = _default("scheduler")
    output_format: str = _default("output_format")
    output_quality: int = _default("output_quality")
    #: `kolors-img2img`: the sha256 of the input picture and how much of it is redrawn (None: text to image).
    image: str | None = None
    strength: float | None = None
    #: The IP-Adapter's reference (sha256) and scale; None without a reference.
    ip_adapter_image: str | None = None
    ip_adapter_scale: float | None = None
    #: The bytes of the input pictures by sha256, as the worker read them from the blob store (never
    #: serialised: records and answers carry the sha256 only).
    inputs: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def steps_run(self) -> int:
        """The denoising steps a request runs: steps, or int(steps × strength) for image to image."""
        return self.steps if self.strength is None else int(self.steps * self.strength)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed+i (wrapping at 2^32, the range a generator seed takes here)."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.number_of_images)]

    def to_dict(self) -> dict[str, Any]:
        """The record's form: no input bytes, and the image fields only where they are used."""
        # every field but `inputs` is a scalar: no deep copy (`asdict`) on the submit path
        out = {name: getattr(self, name) for name in _RECORD_FIELDS}
        for name in ("image", "strength", "ip_adapter_image", "ip_adapter_scale"):
            if out[name] is None:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateParams:
        return cls(**data)


#: The fields of a request's record (`GenerateParams.to_dict`).
_RECORD_FIELDS = tuple(f.name for f in fields(GenerateParams) if f.name != "inputs")


def price(params: GenerateParams, unit_price: float = 1.0) -> float:
    """Credits: number_of_images × steps run/25 × (w·h)/1024² × unit (the seed request costs 1.0; steps
    run = int(steps × strength) for image to image)."""
    units = params.number_of_images * (params.steps_run / 25) * (params.width * params.height / 1024**2)
    return round(units * unit_price, 6)


def decimal(text: str | None, max_digits: int = 18, *, lo: int = 0, hi: int | None = None) -> int | None:
    """`text` as an integer when it is 1..max_digits ASCII digits and within lo..hi, else None.

    The one parser for numbers that come from a URL, a query, a header or a string field:
    `str.isdigit()` alone also accepts "²" and other scripts' digits, which `int()` then refuses or
    reads, and `int()` of 5000 digits is slow and overflows SQLite and Redis integers."""
    if not text or len(text) > max_digits or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    if value < lo or (hi is not None and value > hi):
        return None
    return value


def short(value: Any, limit: int = 100) -> str:
    """`repr(value)`, cut to `limit` characters: an error message never echoes a whole body (every
    value an error quotes goes through here, a 4300-digit number too)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def is_finite(value: int | float) -> bool:
    """`math.isfinite` without its OverflowError: an int beyond float range (JSON reads up to 4300
    digits) is finite, and the range check that follows refuses it naming the field."""
    return isinstance(value, int) or math.isfinite(value)


def clip(text: str, limit: int = 100) -> str:
    """`text` as it is, cut to `limit` characters (ids and names from a URL path, in messages)."""
    return text if len(text) <= limit else text[:limit] + "…"


#: Characters that draw nothing but are neither whitespace nor format (Cf) characters to Python.
_BLANKS = frozenset("\u2800\u3164\u115f\u1160\uffa0")


def is_blank(text: str) -> bool:
    """True when `text` draws nothing: whitespace, format characters (\\u200b, \\ufeff…), controls."""
    return all(ch.isspace() or ch in _BLANKS or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp")
               for ch in text)


def bad_text(value: Any, where: str = "body") -> str | None:
    """Where `value` (decoded JSON) holds a string that is not valid Unicode (a lone surrogate), or None."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            if not _scalar(item):
                return at
        elif isinstance(item, dict):
            for k, v in item.items():
                name = k if at == "body" else f"{at}.{k}"
                if isinstance(k, str) and not _scalar(k):
                    return at  # a field name: the object that holds it
                stack.append((v, name if _scalar(name) else at))
        elif isinstance(item, list):
            stack.extend((v, at) for v in item)
    return None


def check_text(value: Any) -> None:
    """Raise `BadRequest` naming the field when decoded JSON (or CLI input) holds a lone surrogate:
    JSON's ``\\ud800`` escapes and undecodable argv bytes decode to them, and no store, log or
    encoder takes them."""
    where = bad_text(value)
    if where is not None:
        raise BadRequest(f"{where}: must be valid Unicode text (a lone surrogate such as \\ud800)")


def _scalar(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unknown_fields(names: list[str]) -> BadRequest:
    """The 400 for fields a body may not carry: ``"a, b: unknown fields"`` (sorted)."""
    names = sorted(names)
    shown = [n if len(n) <= 100 else n[:100] + "…" for n in names[:10]] + (["…"] if len(names) > 10 else [])
    return BadRequest(f"{', '.join(shown)}: unknown field{'s' if len(names) > 1 else ''}")


def kind_of(value: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


#: Other spellings an enum takes, as the value they stand for (`jpeg`: the OpenAI route's name of jpg).
ALIASES: dict[str, dict[str, str]] = {"output_format": {"jpeg": "jpg"}}


def check(p: Param, value: Any) -> Any:
    """`value` checked against its table entry; raises `BadRequest` naming the field."""
    name = p.name
    if p.kind == "enum":
        value = ALIASES.get(name, {}).get(value, value) if isinstance(value, str) else value
        if not isinstance(value, str) or value not in p.choices:
            raise BadRequest(f"{name}: must be one of {', '.join(p.choices)}, got {short(value)}")
        return value
    if p.kind == "string":
        if not isinstance(value, str):
            raise BadRequest(f"{name}: must be a string, got {kind_of(value)}")
        if p.max_length is not None and len(value) > p.max_length:
            raise BadRequest(f"{name}: must be at most {p.max_length} characters, got {len(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int if p.kind == "integer" else int | float):
        raise BadRequest(f"{name}: must be {'an integer' if p.kind == 'integer' else 'a number'}, "
                         f"got {kind_of(value)}")
    if p.kind == "number" and not is_finite(value):
        raise BadRequest(f"{name}: must be a finite number, got {short(value)}")
    assert p.lo is not None and p.hi is not None
    if not p.lo <= value <= p.hi:
        lo, hi = (f"{p.lo:g}", f"{p.hi:g}") if p.kind == "number" else (int(p.lo), int(p.hi))
        raise BadRequest(f"{name}: must be between {lo} and {hi}, got {short(value)}")
    if p.multiple_of and value % p.multiple_of:
        lo = value - value % p.multiple_of
        raise BadRequest(f"{name}: must be a multiple of {p.multiple_of}, got {short(value)} "
                         f"(nearest valid: {lo} or {lo + p.multiple_of})")
    # + 0.0 makes -0.0 plain 0.0 (JSON's -0 is the number 0)
    return float(value) + 0.0 if p.kind == "number" else value


def validate(body: Any, model: str = MODEL, *, ip_adapter: bool = True) -> GenerateParams:
    """Check a request body against the model's table and return the params, or raise `BadRequest`
    naming the field. Image fields keep their raw value here (`validate_request` for the API's intake)."""
    checked = validate_request(body, model, ip_adapter=ip_adapter)
    return replace(checked.params, image=checked.images.get("image"),
                   ip_adapter_image=checked.images.get("ip_adapter_image"))


@dataclass(frozen=True)
class Checked:
    """A body checked against its model's table (`validate_request`), before the pictures are taken."""

    params: GenerateParams
    #: Image field -> its raw value (base64, a data URI or an http(s) URL), for the intake.
    images: dict[str, str]
    #: The parameter names the body set (width/height omitted: `with_inputs` sizes the output).
    given: frozenset[str]


def validate_request(body: Any, model: str = MODEL, *, ip_adapter: bool = True) -> Checked:
    """Check a request body of `model` (`kolors` or `kolors-img2img`); raise `BadRequest` naming the field.

    `ip_adapter`: whether the server runs one (else `ip_adapter_image` is the 400 `NO_IP_ADAPTER`)."""
    if not isinstance(body, dict):
        raise BadRequest(f"body: must be a JSON object, got {kind_of(body)}")
    table = params_of(model)
    unknown = set(body) - {p.name for p in table}
    if unknown:
        raise unknown_fields(list(unknown))
    if "prompt" not in body:
        raise BadRequest("prompt: is required")
    if model == IMG2IMG and body.get("image") is None:
        raise BadRequest("image: is required (base64, a data URI or an http(s) URL)")
    if body.get("ip_adapter_image") is not None and not ip_adapter:
        raise BadRequest(NO_IP_ADAPTER)
    values: dict[str, Any] = {}
    images: dict[str, str] = {}
    for p in table:
        value = body.get(p.name, p.default)
        if p.kind == "image":
            if value is None:
                continue
            if not isinstance(value, str):
                raise BadRequest(f"{p.name}: must be a string (base64, a data URI or an http(s) URL), "
                                 f"got {kind_of(value)}")
            images[p.name] = value
            continue
        if p.name == "prompt":
            value = check(Param("prompt", "string"), value).strip()
            if is_blank(value):
                raise BadRequest("prompt: must not be empty")
        elif p.name == "seed" and (value is None or (type(value) is int and value == -1)):
            value = _SEEDS.randrange(MAX_SEED + 1)
        values[p.name] = check(p, value)
    if "strength" in values:
        strength = values["strength"]
        if strength <= 0:
            raise BadRequest(f"strength: must be more than 0 and at most 1, got {short(body.get('strength'))}")
        if int(values["steps"] * strength) < 1:
            raise BadRequest(f"strength: steps × strength must be at least 1 (steps {values['steps']} × strength "
                             f"{strength:g} runs no step); raise strength or steps")
    if "ip_adapter_image" not in images:
        values.pop("ip_adapter_scale", None)  # no reference: nothing to scale (and no batch split by it)
    return Checked(GenerateParams(**values), images, frozenset(body))


def with_inputs(checked: Checked, taken: dict[str, tuple[str, int, int]]) -> GenerateParams:
    """The params once the pictures are taken: `taken` maps each image field to (sha256, width,
    height) of its picture. The output of image to image without width/height keeps the input's
    aspect ratio (`kolors_api.images.auto_size`)."""
    sha = {name: value[0] for name, value in taken.items()}
    params = replace(checked.params, image=sha.get("image"), ip_adapter_image=sha.get("ip_adapter_image"))
    if "image" in taken and not {"width", "height"} <= checked.given:
        from kolors_api.images import auto_size  # Pillow: only where a picture came

        _, width, height = taken["image"]
        w, h = auto_size(width, height, params.width if "width" in checked.given else None,
                         params.height if "height" in checked.given else None)
        params = replace(params, width=w, height=h)
    return params


#: The fields of a submit body beside the model's parameters (the JSON Schema of each).
WEBHOOK_FIELDS: dict[str, dict[str, Any]] = {
    "webhook": {"type": "string", "maxLength": 2048,
                "description": "An http(s) URL to POST the request's status body to (signed per Standard "
                               "Webhooks); addresses of private networks are refused."},
    "webhook_events_filter": {"type": "array", "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                              "minItems": 1, "uniqueItems": True, "default": ["completed"],
                              "description": "The events delivered to `webhook`."},
}


def split_webhook(body: Any) -> tuple[Any, str | None, tuple[str, ...]]:
    """(the body without the webhook fields, the webhook URL or None, its events); `BadRequest` naming
    the field when one is malformed (the URL's SSRF check is the API's)."""
    if not isinstance(body, dict):
        return body, None, ("completed",)
    rest = {k: v for k, v in body.items() if k not in WEBHOOK_FIELDS}
    url, events = body.get("webhook"), body.get("webhook_events_filter", ["completed"])
    if url is not None and not isinstance(url, str):
        raise BadRequest(f"webhook: must be an http or https URL, got {kind_of(url)}")
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise BadRequest(f"webhook_events_filter: must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}, "
                         f"got {short(events)}")
    unknown = [e for e in events if e not in WEBHOOK_EVENTS]
    if unknown:
        raise BadRequest(f"webhook_events_filter: {short(unknown[0])} is not an event; the events are "
                         f"{', '.join(WEBHOOK_EVENTS)}")
    return rest, url, tuple(dict.fromkeys(events))


def json_schema(model: str = MODEL, *, ip_adapter: bool = True) -> dict[str, Any]:
    """The JSON Schema of a request body of `model` (served by `GET /v1/models`); the IP-Adapter's
    fields only when the server runs one."""
    properties: dict[str, Any] = {}
    for p in params_of(model):
        if p in IP_ADAPTER_PARAMS and not ip_adapter:
            continue
        if p.kind == "image":
            properties[p.name] = {**IMAGE_SCHEMA, "description": f"{p.description} {IMAGE_SCHEMA['description']}"}
            continue
        prop: dict[str, Any] = {"type": "string" if p.kind == "enum" else p.kind}
        if p.choices:
            prop["enum"] = list(p.choices)
        if p.max_length is not None:
            prop["maxLength"] = p.max_length
        if p.lo is not None:
            prop["minimum"] = p.lo if p.kind == "number" else int(p.lo)
        if p.hi is not None:
            prop["maximum"] = p.hi if p.kind == "number" else int(p.hi)
        if p.multiple_of:
            prop["multipleOf"] = p.multiple_of
        if p.default is not None:
            prop["default"] = p.default
        if p.description:
            prop["description"] = p.description
        properties[p.name] = {k: v for k, v in {**prop, **p.schema}.items() if v is not None}
    properties |= WEBHOOK_FIELDS
    required = ["prompt", "image"] if model == IMG2IMG else ["prompt"]
    return {"type": "object", "additionalProperties": False, "required": required, "properties": properties}
