"""The request parameters of the `kolors` model: names, ranges, defaults (DESIGN.md §2).

Both the API (validation, pricing, the JSON Schema of `/v1/models`) and the worker (the engine's
input) import this module; it has no heavy dependencies.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from kolors_api.errors import BadRequest

MODEL = "kolors"
MODELS = (MODEL,)

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
MAX_PROMPT = 2000


@dataclass(frozen=True)
class GenerateParams:
    """One validated request; `seed` is always resolved (never -1)."""

    prompt: str
    negative_prompt: str = ""
    cfg: float = 6.0
    seed: int = 0
    steps: int = 25
    width: int = 1024
    height: int = 1024
    number_of_images: int = 1
    scheduler: str = "EulerDiscreteScheduler"
    output_format: str = "webp"
    output_quality: int = 80

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed+i (wrapping at 2^32, the range a generator seed takes here)."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.number_of_images)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateParams:
        return cls(**data)


def price(params: GenerateParams, unit_price: float = 1.0) -> float:
    """Credits: number_of_images × steps/25 × (w·h)/1024² × unit (the seed request costs 1.0)."""
    units = params.number_of_images * (params.steps / 25) * (params.width * params.height / 1024**2)
    return round(units * unit_price, 6)


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: must be an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name}: must be a number, got {_kind(value)}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: must be between {lo:g} and {hi:g}, got {value}")
    return float(value)


def _str(name: str, value: Any, max_len: int) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name}: must be a string, got {_kind(value)}")
    if len(value) > max_len:
        raise BadRequest(f"{name}: must be at most {max_len} characters, got {len(value)}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BadRequest(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _size(name: str, value: Any) -> int:
    size = _int(name, value, 512, 2048)
    if size % 8:
        lo, hi = size - size % 8, size - size % 8 + 8
        raise BadRequest(f"{name}: must be a multiple of 8, got {size} (nearest valid: {lo} or {hi})")
    return size


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


FIELDS = ("prompt", "negative_prompt", "cfg", "seed", "steps", "width", "height", "number_of_images",
          "scheduler", "output_format", "output_quality")


def validate(body: Any) -> GenerateParams:
    """Check a request body against §2 and return the params, or raise `BadRequest` naming the field."""
    if not isinstance(body, dict):
        raise BadRequest(f"body: must be a JSON object, got {_kind(body)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"{', '.join(unknown)}: unknown field{'s' if len(unknown) > 1 else ''}")
    if "prompt" not in body:
        raise BadRequest("prompt: is required")
    prompt = _str("prompt", body["prompt"], 10**9).strip()
    if not prompt:
        raise BadRequest("prompt: must not be empty")
    if len(prompt) > MAX_PROMPT:
        raise BadRequest(f"prompt: must be at most {MAX_PROMPT} characters, got {len(prompt)}")
    seed = body.get("seed", -1)
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed == -1):
        seed = secrets.randbelow(MAX_SEED + 1)
    return GenerateParams(
        prompt=prompt,
        negative_prompt=_str("negative_prompt", body.get("negative_prompt", ""), MAX_PROMPT),
        cfg=_number("cfg", body.get("cfg", 6), 0, 20),
        seed=_int("seed", seed, 0, MAX_SEED),
        steps=_int("steps", body.get("steps", 25), 1, 50),
        width=_size("width", body.get("width", 1024)),
        height=_size("height", body.get("height", 1024)),
        number_of_images=_int("number_of_images", body.get("number_of_images", 1), 1, 10),
        scheduler=_choice("scheduler", body.get("scheduler", SCHEDULERS[0]), SCHEDULERS),
        output_format=_choice("output_format", body.get("output_format", "webp"), OUTPUT_FORMATS),
        output_quality=_int("output_quality", body.get("output_quality", 80), 0, 100),
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a `kolors` request body (served by `GET /v1/models`)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT,
                       "description": "What to draw; the text encoder sees at most 256 tokens."},
            "negative_prompt": {"type": "string", "maxLength": MAX_PROMPT, "default": ""},
            "cfg": {"type": "number", "minimum": 0, "maximum": 20, "default": 6},
            "seed": {"type": "integer", "minimum": -1, "maximum": MAX_SEED, "default": -1,
                     "description": "-1 or omitted: random; the seed used is returned."},
            "steps": {"type": "integer", "minimum": 1, "maximum": 50, "default": 25},
            "width": {"type": "integer", "minimum": 512, "maximum": 2048, "multipleOf": 8, "default": 1024},
            "height": {"type": "integer", "minimum": 512, "maximum": 2048, "multipleOf": 8, "default": 1024},
            "number_of_images": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
            "scheduler": {"type": "string", "enum": list(SCHEDULERS), "default": SCHEDULERS[0]},
            "output_format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "webp"},
            "output_quality": {"type": "integer", "minimum": 0, "maximum": 100, "default": 80},
        },
    }
