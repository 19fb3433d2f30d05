"""The bodies on the wire as pydantic models: what `/openapi.json` documents and what the routes check.

Request bodies are read by hand (`deps.read_json`: a size limit before parsing, our own 400s) and
checked with `parse_body(Model, data)`, which names the field in the one error style of the API
(``"credits: must be a number between 0 and 1e+09 or null, got 'x'"``). The Segmind body has its
own table in `kolors_api.schema`; its JSON Schema is declared on the routes from there.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError

from kolors_api.api.limits import MAX_QUOTA, parse_limit
from kolors_api.errors import BadRequest
from kolors_api.jobs.base import MAX_CREDITS
from kolors_api.jobs.fair import DEFAULT_WEIGHT, MAX_WEIGHT, MIN_WEIGHT
from kolors_api.schema import SCHEDULERS, check_text, is_finite, short, unknown_fields

M = TypeVar("M", bound=BaseModel)

#: The largest credit amount or concurrency a key may hold (keeps every value finite and exact in
#: micro-credits: see `kolors_api.jobs.base.MAX_CREDITS`).
MAX_AMOUNT = MAX_CREDITS


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("kolors", message)


def parse_rate(value: Any) -> str | None:
    """`"N/min"` (also /s, /hour) with N ≥ 1, or None; raises ValueError otherwise."""
    if value is None:
        return None
    if not isinstance(value, str) or parse_limit(value).amount < 1:
        raise ValueError(value)
    return value.strip()


def _rate(value: Any) -> str | None:
    try:
        return parse_rate(value)
    except ValueError:
        raise _fail(f"must look like \"10/min\" (1 to {MAX_QUOTA} per s, min or hour) or be null, "
                    f"got {short(value)}") from None


def _amount(lo: float, *, integer: bool = False, nullable: bool = True) -> BeforeValidator:
    """A finite number in [lo, MAX_AMOUNT] (an integer when asked), or null when nullable."""

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or not is_finite(value) or not lo <= value <= MAX_AMOUNT:
            kind = "an integer" if integer else "a finite number" if ok and not is_finite(value) else "a number"
            raise _fail(f"must be {kind} between {lo:g} and {MAX_AMOUNT:g}{' or null' if nullable else ''}, "
                        f"got {short(value)}")
        return value + 0 if isinstance(value, float) else value  # -0.0 is stored as 0.0

    return BeforeValidator(check)


def _weight(value: Any) -> float:
    """A key's share of the workers (`kolors_api.jobs.fair`): a finite number in [MIN_WEIGHT, MAX_WEIGHT]."""
    # compared as it comes: an int beyond float range is refused here, never an OverflowError (500)
    if (isinstance(value, bool) or not isinstance(value, int | float) or not is_finite(value)
            or not MIN_WEIGHT <= value <= MAX_WEIGHT):
        raise _fail(f"must be a number greater than 0 and at most {MAX_WEIGHT:g} (a key's share of the workers; "
                    f"default 1), got {short(value)}")
    return float(value)


#: Unicode categories a key name may not hold: control (NUL, newlines), format (U+202E, zero-width),
#: line and paragraph separators, surrogates, private use: names are printed in logs, the CLI and the
#: playground, where these forge lines or reorder text.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co"})


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise _fail("must be a non-empty string of at most 200 characters")
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in _UNPRINTABLE:
            raise _fail(f"must not contain control or format characters, got U+{ord(ch):04X} at position {i}")
    return value.strip()


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail("must be a boolean")
    return value


_NAME_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 200}
Name = Annotated[str, BeforeValidator(_name), WithJsonSchema(_NAME_SCHEMA)]
Flag = Annotated[bool, BeforeValidator(_flag)]
# Fields a PATCH may leave out but never set to null (the validators refuse an explicit null).
OptName = Annotated[str | None, BeforeValidator(_name), WithJsonSchema(_NAME_SCHEMA)]
OptFlag = Annotated[bool | None, BeforeValidator(_flag), WithJsonSchema({"type": "boolean"})]
Delta = Annotated[float | None, _amount(-MAX_AMOUNT, nullable=False),
                  WithJsonSchema({"type": "number", "minimum": -MAX_AMOUNT, "maximum": MAX_AMOUNT})]
Credits = Annotated[float | None, _amount(0), Field(json_schema_extra={"minimum": 0, "maximum": MAX_AMOUNT})]
Rate = Annotated[str | None, BeforeValidator(_rate), Field(examples=["10/min"])]
Concurrency = Annotated[int | None, _amount(1, integer=True),
                        Field(json_schema_extra={"minimum": 1, "maximum": MAX_AMOUNT})]
_WEIGHT_SCHEMA = {"type": "number", "exclusiveMinimum": 0, "minimum": MIN_WEIGHT, "maximum": MAX_WEIGHT,
                  "description": "the key's share of the workers while several keys have queued work (default 1)"}
Weight = Annotated[float, BeforeValidator(_weight), WithJsonSchema(_WEIGHT_SCHEMA)]
OptWeight = Annotated[float | None, BeforeValidator(_weight), WithJsonSchema(_WEIGHT_SCHEMA)]


class Body(BaseModel):
    """A request body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class KeyCreate(Body):
    """`POST /v1/admin/keys`: a new key (credits null = unlimited)."""

    name: Name
    credits: Credits = None
    rate_limit: Rate = None
    max_concurrency: Concurrency = None
    weight: Weight = DEFAULT_WEIGHT
    admin: Flag = False


class KeyUpdate(Body):
    """`PATCH /v1/admin/keys/{id}`: only the fields sent change; `add_credits` moves the balance."""

    name: OptName = None
    credits: Credits = None
    add_credits: Delta = None
    rate_limit: Rate = None
    max_concurrency: Concurrency = None
    weight: OptWeight = None
    admin: OptFlag = None
    enabled: OptFlag = None


class ImageGenerationRequest(Body):
    """`POST /v1/images/generations`: OpenAI's fields, plus Kolors parameters a caller may add.

    `model`, `quality`, `style`, `user`, `background` and `moderation` do not change a Kolors image;
    they are accepted so that OpenAI client code runs unchanged."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    n: int | None = Field(None, description="number_of_images, 1..10")
    size: str | None = Field(None, examples=["1024x1024"], description='"WxH" or "auto"; 512..2048, multiples of 8')
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "jpg", "webp"] | None = None
    output_compression: int | None = Field(None, description="output_quality, 0..100")
    stream: bool | None = Field(None, description="not supported: must be false or absent")
    negative_prompt: str | None = None
    cfg: float | None = None
    seed: int | None = None
    steps: int | None = None
    scheduler: Literal[SCHEDULERS] | None = None  # type: ignore[valid-type]
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None


def parse_body(model: type[M], data: Any) -> M:
    """`data` (decoded JSON) as `model`, or `BadRequest` naming the field(s) in the API's style."""
    if not isinstance(data, dict):
        raise BadRequest("body: must be a JSON object")
    check_text(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            raise unknown_fields(unknown) from None
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or "body"
        message = first["msg"] if first["type"] == "kolors" else f"{first['msg'][:1].lower()}{first['msg'][1:]}"
        if first["type"] == "missing":
            message = "is required"
        elif first["type"] != "kolors":
            message += f", got {short(first.get('input'))}"
        raise BadRequest(f"{where}: {message}") from None


# -- responses
class ErrorBody(BaseModel):
    """Every error: `error` says what is wrong; a FAILED job or a 504 also carries its request."""

    model_config = ConfigDict(extra="allow")

    error: str
    request_id: str | None = None
    status: str | None = None


class Progress(BaseModel):
    step: int
    total_steps: int
    phase: Literal["denoising", "decoding", "encoding", "storing"] = Field(
        description="denoising (step of total_steps), then decoding, encoding and storing the images")


class StatusBody(BaseModel):
    """`GET /v2/requests/{id}/status` (and the result route while a job runs)."""

    request_id: str
    status: Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
    queue_position: int | None = Field(None, description="queued jobs the fair order serves before this one if "
                                                         "no other arrives: 0 is next (QUEUED only)")
    progress: Progress | None = None
    attempt: int | None = Field(None, description="the delivery of a job handed out again after its worker was "
                                                  "lost (2 on the first retry); absent on the first")
    error: str | None = None


class CancelBody(StatusBody):
    cancel_requested: bool


class Submitted(BaseModel):
    request_id: str
    status: Literal["QUEUED"]
    status_url: str
    response_url: str


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    inference_time: float
    queue_time: float
    total_time: float


class ResultBody(BaseModel):
    """`GET /v2/requests/{id}` of a COMPLETED job: signed output URLs, seeds, timings, the input."""

    request_id: str
    status: Literal["COMPLETED"]
    output: list[str]
    seeds: list[int]
    metrics: Metrics
    input: dict[str, Any]


class SyncImages(BaseModel):
    """`POST /v1/{model}` as JSON (several images, or `Accept: application/json`)."""

    request_id: str
    images: list[str] = Field(description="base64")
    seeds: list[int]
    metrics: Metrics


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's answer of `POST /v1/images/generations`."""

    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]


class KeyPublic(BaseModel):
    """A key as listed: never the key itself, only its prefix."""

    id: str
    name: str
    prefix: str
    admin: bool
    enabled: bool
    credits: float | None
    rate_limit: str | None
    max_concurrency: int | None
    weight: float = Field(description="share of the workers while several keys have queued work")
    created_at: float


class KeyCreated(KeyPublic):
    key: str = Field(description="shown only in this answer")


class KeyList(BaseModel):
    data: list[KeyPublic]


class KeyDeleted(BaseModel):
    id: str
    deleted: bool


class Usage(BaseModel):
    credits_spent: float = Field(description="captured by COMPLETED requests")
    credits_reserved: float = Field(description="held by requests still queued or running")
    requests: int
    running: int


class Limits(BaseModel):
    rate_limit: str | None
    max_concurrency: int | None
    weight: float = Field(description="share of the workers while several keys have queued work (fair queuing)")


class Account(BaseModel):
    id: str
    name: str
    admin: bool
    credits: float | None
    limits: Limits
    usage: Usage
    webhook_secret: str = Field(description="The `whsec_` secret that signs this key's webhooks (Standard Webhooks)")


class WebhookSecret(BaseModel):
    id: str
    webhook_secret: str


class WebhookAttempt(BaseModel):
    delivery_id: str = Field(description="the `webhook-id` of the delivery (the same for each try)")
    event: Literal["start", "progress", "completed", "failed"]
    attempt: int
    at: float
    status: int | None = Field(description="the receiver's HTTP status; null when no answer came")
    latency: float
    error: str | None


class WebhookAttempts(BaseModel):
    request_id: str
    data: list[WebhookAttempt]


class HistoryItem(BaseModel):
    request_id: str
    model: str
    status: Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
    cost: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None


class History(BaseModel):
    data: list[HistoryItem]
    next_cursor: str | None


class Pricing(BaseModel):
    formula: str
    unit_price: float
    default_request: float


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"]
    owned_by: str
    weights: str
    random_weights: bool = Field(description="true for test weights (the tiny model, random:SIZE): they draw "
                                             "noise, not pictures")
    parameters: dict[str, Any] = Field(description="the JSON Schema of the request body")
    images: dict[str, bool] = Field(description="which picture fields the model takes on this server "
                                                "(`image`, `ip_adapter_image`)")
    pricing: Pricing


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelInfo]


class Health(BaseModel):
    status: str


class EngineProcess(BaseModel):
    """One of `serve`'s engine processes (`kolors_api.worker.supervisor`)."""

    index: int
    device: str
    state: str = Field(description="starting, ready, restarting or stopped")
    pid: int | None
    worker_id: str | None
    restarts: int
    last_exit: str | None = Field(description="how its last process ended, e.g. `killed by SIGKILL`")


class Ready(Health):
    workers: int
    queued: int
    engines: list[EngineProcess] | None = Field(None, description="serve's engine processes (none in an API "
                                                "started with --no-worker)")


class OpenAIErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """An error on the OpenAI route, in OpenAI's shape (its SDK shows `error.message`)."""

    model_config = ConfigDict(extra="allow")

    error: OpenAIErrorObject


def errors(*codes: int, body: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: these error statuses, each with the `ErrorBody` shape (or `body`)."""
    return {code: {"model": body} for code in codes}


def json_request(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON request body that the route reads by hand."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


#: The Idempotency-Key header every submit route takes (docs/api.md#idempotency-key).
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                   "description": "The same key with the same body within 24 h: the same answer, one job, "
                                  "one charge; with another body: 422."}


def submit_request(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` of a submit route: its JSON body, and the Idempotency-Key header."""
    return {**json_request(schema), "parameters": [IDEMPOTENCY_KEY]}


def request_of(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring `model` as the JSON request body."""
    return json_request(model.model_json_schema(ref_template="#/components/schemas/{model}"))
