"""Key management (admin keys only), the caller's account and request history."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kolors_api.api.app import read_json, service
from kolors_api.api.auth import authenticate
from kolors_api.api.limits import parse_limit
from kolors_api.errors import BadRequest, NotFound
from kolors_api.jobs import ApiKey, make_key_record, new_key

router = APIRouter()

def parse_rate(value: Any, field: str = "rate_limit") -> str | None:
    """`"N/min"` (also /s, /hour) with N ≥ 1, or null."""
    if value is None:
        return None
    try:
        if not isinstance(value, str) or parse_limit(value).amount < 1:
            raise ValueError(value)
    except ValueError:
        raise BadRequest(f"{field}: must look like \"10/min\" or be null, got {value!r}") from None
    return value.strip()


#: The largest credit amount or concurrency a key may hold (keeps every value finite and storable).
MAX_AMOUNT = 1e12


def _number(name: str, value: Any, *, lo: float, integer: bool = False, nullable: bool = True) -> Any:
    """A finite number in [lo, MAX_AMOUNT] (an integer when asked), or None when nullable."""
    if value is None and nullable:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or not lo <= value <= MAX_AMOUNT:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{name}: must be {kind} between {lo:g} and {MAX_AMOUNT:g}"
                         f"{' or null' if nullable else ''}, got {value!r}")
    return value


def key_fields(body: Any, *, create: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    allowed = {"name", "credits", "rate_limit", "max_concurrency", "admin"}
    allowed |= set() if create else {"enabled", "add_credits"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"{', '.join(unknown)}: unknown field{'s' if len(unknown) > 1 else ''}")
    out: dict[str, Any] = {}
    if create or "name" in body:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise BadRequest("name: must be a non-empty string of at most 200 characters")
        out["name"] = name.strip()
    for flag in ("admin", "enabled"):
        if flag in body:
            if not isinstance(body[flag], bool):
                raise BadRequest(f"{flag}: must be a boolean")
            out[flag] = body[flag]
    if "credits" in body:
        out["credits"] = _number("credits", body["credits"], lo=0)
    if "add_credits" in body:
        out["add_credits"] = _number("add_credits", body["add_credits"], lo=-MAX_AMOUNT, nullable=False)
    if "rate_limit" in body:
        out["rate_limit"] = parse_rate(body["rate_limit"])
    if "max_concurrency" in body:
        out["max_concurrency"] = _number("max_concurrency", body["max_concurrency"], lo=1, integer=True)
    return out


@router.post("/v1/admin/keys", status_code=201, summary="Create an API key (shown only in this answer)")
async def create_key(request: Request) -> Response:
    svc = service(request)
    await authenticate(svc.store, request, admin=True)
    fields = key_fields(await read_json(request, svc.settings.max_body_bytes), create=True)
    key = new_key()
    record = make_key_record(fields.pop("name"), key, **fields)
    await svc.store.add_key(record)
    return JSONResponse({**record.public(), "key": key}, status_code=201)


@router.get("/v1/admin/keys", summary="List API keys")
async def list_keys(request: Request) -> Response:
    svc = service(request)
    await authenticate(svc.store, request, admin=True)
    return JSONResponse({"data": [k.public() for k in await svc.store.list_keys()]})


@router.patch("/v1/admin/keys/{key_id}", summary="Change a key: credits, enabled, limits")
async def update_key(key_id: str, request: Request) -> Response:
    svc = service(request)
    await authenticate(svc.store, request, admin=True)
    fields = key_fields(await read_json(request, svc.settings.max_body_bytes), create=False)
    current = await svc.store.get_key(key_id)
    if current is None:
        raise NotFound(f"unknown key: {key_id}")
    add = fields.get("add_credits")
    if add is not None and "credits" not in fields:
        balance = (current.credits or 0) + add
        if balance < 0 or balance > MAX_AMOUNT:
            raise BadRequest(f"add_credits: would make the balance {balance:g}, outside 0..{MAX_AMOUNT:g}")
    record = await svc.store.update_key(key_id, **fields)
    if record is None:
        raise NotFound(f"unknown key: {key_id}")
    return JSONResponse(record.public())


@router.delete("/v1/admin/keys/{key_id}", summary="Delete a key")
async def delete_key(key_id: str, request: Request) -> Response:
    svc = service(request)
    await authenticate(svc.store, request, admin=True)
    if not await svc.store.delete_key(key_id):
        raise NotFound(f"unknown key: {key_id}")
    return JSONResponse({"id": key_id, "deleted": True})


def _usage(key: ApiKey, ledger: list[Any]) -> dict[str, Any]:
    spent = -sum(e.amount for e in ledger if e.kind in ("reserve", "refund"))
    return {"credits_spent": round(spent, 6), "requests": sum(1 for e in ledger if e.kind == "reserve")}


@router.get("/v1/account", summary="The caller's credits, limits and usage")
async def account(request: Request) -> Response:
    svc = service(request)
    key = await authenticate(svc.store, request)
    ledger = await svc.store.ledger(key.id)
    running = await svc.store.running_count(key.id)
    return JSONResponse({
        "id": key.id, "name": key.name, "admin": key.admin, "credits": key.credits,
        "limits": {"rate_limit": key.rate_limit, "max_concurrency": key.max_concurrency},
        "usage": {**_usage(key, ledger), "running": running},
    })


@router.get("/v1/requests", summary="The caller's own request history, newest first")
async def history(request: Request) -> Response:
    svc = service(request)
    key = await authenticate(svc.store, request)
    raw = request.query_params.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise BadRequest(f"limit: must be an integer between 1 and 100, got {raw!r}")
    jobs, cursor = await svc.store.history(key.id, int(raw), request.query_params.get("cursor"))
    return JSONResponse({"data": [{
        "request_id": j.id, "model": j.model, "status": j.state.value, "cost": j.cost,
        "created_at": j.created_at, "started_at": j.started_at, "finished_at": j.finished_at,
        "error": j.error,
    } for j in jobs], "next_cursor": cursor})
