"""Key management (admin keys only), the caller's account and request history."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kolors_api.api.deps import AdminKey, CallerKey, JsonBody, ServiceDep
from kolors_api.api.models import (
    Account,
    History,
    KeyCreate,
    KeyCreated,
    KeyDeleted,
    KeyList,
    KeyPublic,
    KeyUpdate,
    WebhookSecret,
    errors,
    parse_body,
    request_of,
)
from kolors_api.errors import BadRequest, NotFound, from_store
from kolors_api.jobs import LedgerEntry, StoreError, make_key_record, new_key, revoke
from kolors_api.jobs.base import credits_of, micro
from kolors_api.schema import clip, decimal, short

router = APIRouter()
ADMIN_ERRORS = errors(400, 401, 403, 413)


@router.post("/v1/admin/keys", status_code=201, summary="Create an API key (shown only in this answer)",
             openapi_extra=request_of(KeyCreate), response_model=KeyCreated, responses=ADMIN_ERRORS)
async def create_key(svc: ServiceDep, admin: AdminKey, body: JsonBody) -> Response:
    fields = parse_body(KeyCreate, body).model_dump()
    key = new_key()
    record = make_key_record(fields.pop("name"), key, **fields)
    await svc.store.add_key(record)
    return JSONResponse({**record.public(), "key": key}, status_code=201)


@router.get("/v1/admin/keys", summary="List API keys", response_model=KeyList, responses=errors(401, 403))
async def list_keys(svc: ServiceDep, admin: AdminKey) -> Response:
    return JSONResponse({"data": [k.public() for k in await svc.store.list_keys()]})


@router.patch("/v1/admin/keys/{key_id}", summary="Change a key: credits, enabled, limits, weight",
              openapi_extra=request_of(KeyUpdate), response_model=KeyPublic, responses=errors(400, 401, 403, 404, 413))
async def update_key(key_id: str, svc: ServiceDep, admin: AdminKey, body: JsonBody) -> Response:
    fields = parse_body(KeyUpdate, body).model_dump(exclude_unset=True)
    try:
        # the store bounds `add_credits` in the same transaction as the write (no race with submits)
        if fields.get("enabled") is False:  # its queued and running jobs are cancelled and refunded
            record = await revoke.disable_key(svc.store, key_id, **{k: v for k, v in fields.items() if k != "enabled"})
        else:
            record = await svc.store.update_key(key_id, **fields)
    except StoreError as exc:
        raise from_store(exc) from None
    if record is None:
        raise NotFound(f"unknown key: {clip(key_id)}")
    return JSONResponse(record.public())


@router.delete("/v1/admin/keys/{key_id}", summary="Delete a key", response_model=KeyDeleted,
               responses=errors(401, 403, 404))
async def delete_key(key_id: str, svc: ServiceDep, admin: AdminKey) -> Response:
    if not await revoke.delete_key(svc.store, key_id):  # its queued and running jobs are cancelled, refunded
        raise NotFound(f"unknown key: {clip(key_id)}")
    return JSONResponse({"id": key_id, "deleted": True})


@router.post("/v1/admin/keys/{key_id}/webhook-secret", summary="Rotate a key's webhook signing secret",
              response_model=WebhookSecret, responses=errors(401, 403, 404))
async def rotate_webhook_secret(key_id: str, svc: ServiceDep, admin: AdminKey) -> Response:
    """A new `whsec_` secret signs the key's deliveries from now on (the old one no longer verifies)."""
    if await svc.store.get_key(key_id) is None:
        raise NotFound(f"unknown key: {clip(key_id)}")
    return JSONResponse({"id": key_id, "webhook_secret": await svc.store.rotate_webhook_secret(key_id)})


def _usage(ledger: list[LedgerEntry]) -> dict[str, Any]:
    """Spent (captured: COMPLETED jobs) apart from reserved (jobs still queued or running)."""
    reserved: dict[str, int] = {}
    settled: set[str] = set()
    for e in ledger:
        if e.kind == "reserve":
            reserved[e.request_id] = reserved.get(e.request_id, 0) - micro(e.amount)
        elif e.kind == "capture":
            settled.add(e.request_id)
        elif e.kind == "refund":
            reserved.pop(e.request_id, None)
            settled.add(e.request_id)
    spent = sum(u for rid, u in reserved.items() if rid in settled)
    held = sum(u for rid, u in reserved.items() if rid not in settled)
    return {"credits_spent": credits_of(spent), "credits_reserved": credits_of(held),
            "requests": sum(1 for e in ledger if e.kind == "reserve")}


@router.get("/v1/account", summary="The caller's credits, limits and usage", response_model=Account,
            responses=errors(401, 403))
async def account(svc: ServiceDep, key: CallerKey) -> Response:
    ledger = await svc.store.ledger(key.id)
    running = await svc.store.running_count(key.id)
    return JSONResponse({
        "id": key.id, "name": key.name, "admin": key.admin, "credits": key.credits,
        "limits": {"rate_limit": key.rate_limit, "max_concurrency": key.max_concurrency, "weight": key.weight},
        "usage": {**_usage(ledger), "running": running},
        "webhook_secret": await svc.store.webhook_secret(key.id),
    })


@router.get("/v1/requests", summary="The caller's own request history, newest first", response_model=History,
            responses=errors(400, 401, 403),
            openapi_extra={"parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                                             "default": 20}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "next_cursor of the previous page"}]})
async def history(request: Request, svc: ServiceDep, key: CallerKey) -> Response:
    raw = request.query_params.get("limit", "20")
    limit = decimal(raw, 3)
    if limit is None or not 1 <= limit <= 100:
        raise BadRequest(f"limit: must be an integer between 1 and 100, got {short(raw)}")
    raw_cursor = request.query_params.get("cursor")
    if raw_cursor is not None and decimal(raw_cursor) is None:
        raise BadRequest(f"cursor: must be the next_cursor of a previous page, got {short(raw_cursor)}")
    jobs, cursor = await svc.store.history(key.id, limit, raw_cursor)
    return JSONResponse({"data": [{
        "request_id": j.id, "model": j.model, "status": j.state.value, "cost": j.cost,
        "created_at": j.created_at, "started_at": j.started_at, "finished_at": j.finished_at,
        "error": j.error,
    } for j in jobs], "next_cursor": cursor})
