"""Segmind's wire: `POST /v1/{model}` (sync), `POST /v2/{model}` (async) and the v2 request routes."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kolors_api.api.app import Service, read_json, service
from kolors_api.api.auth import authenticate
from kolors_api.errors import JobFailed, NotFound, SyncTimeout
from kolors_api.jobs import ApiKey, Job, JobState
from kolors_api.schema import CONTENT_TYPES

router = APIRouter()


def status_body(job: Job, position: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": job.id, "status": job.state.value}
    if job.state == JobState.QUEUED and position is not None:
        body["queue_position"] = position
    if job.state == JobState.PROCESSING:
        body["progress"] = {"step": job.step, "total_steps": job.total_steps or job.params.get("steps", 0)}
    if job.state == JobState.FAILED:
        body["error"] = job.error or "failed"
    return body


def failed(job: Job) -> JobFailed:
    return JobFailed(job.error or "failed", extra={"request_id": job.id, "status": "FAILED"})


def links(svc: Service, request: Request, job: Job) -> dict[str, str]:
    base = f"{svc.base_url(request)}/v2/requests/{job.id}"
    return {"status_url": f"{base}/status", "response_url": base}


async def own_job(svc: Service, key: ApiKey, job_id: str) -> Job:
    """The caller's job (admins see all); anything else is 404, so ids of others do not leak."""
    job = await svc.store.get(job_id)
    if job is None or (job.key_id != key.id and not key.admin):
        raise NotFound(f"unknown request: {job_id}")
    return job


async def wait_terminal(svc: Service, request: Request, job: Job) -> Job:
    """Block until COMPLETED/FAILED, or raise 504 carrying the request_id at the sync deadline."""
    deadline = time.monotonic() + svc.settings.sync_timeout_seconds
    while not job.state.terminal:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SyncTimeout(
                f"request {job.id} did not finish within {svc.settings.sync_timeout_seconds:g}s; "
                "it goes on: fetch it from response_url",
                extra={"request_id": job.id, "status": job.state.value, **links(svc, request, job)})
        latest = await svc.store.wait(job.id, job.version, left)
        if latest is None:
            raise NotFound(f"unknown request: {job.id}")
        job = latest
    return job


async def outputs(svc: Service, job: Job) -> list[bytes]:
    images = await asyncio.gather(*(svc.store.read_output(job.id, i) for i in range(job.outputs)))
    if any(img is None for img in images):
        raise NotFound(f"unknown request: {job.id}")
    return [img for img in images if img is not None]


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


@router.post("/v1/{model}", summary="Generate and return the image(s) (sync)")
async def generate_sync(model: str, request: Request) -> Response:
    svc = service(request)
    key = await authenticate(svc.store, request)
    body = await read_json(request, svc.settings.max_body_bytes)
    job = await svc.submit(request, key, model, body, sync=True)
    job = await wait_terminal(svc, request, job)
    if job.state == JobState.FAILED:
        raise failed(job)
    images = await outputs(svc, job)
    headers = {
        "X-Request-Id": job.id,
        "X-Seed": str(job.seeds[0] if job.seeds else job.params["seed"]),
        "X-Inference-Time": f"{job.metrics.get('inference_time', 0.0):.4f}",
    }
    if len(images) == 1 and not wants_json(request):
        return Response(images[0], media_type=CONTENT_TYPES[job.ext], headers=headers)
    return JSONResponse({
        "request_id": job.id,
        "images": [base64.b64encode(img).decode() for img in images],
        "seeds": job.seeds,
        "metrics": job.metrics,
    }, headers=headers)


@router.post("/v2/{model}", summary="Submit an async request")
async def submit_async(model: str, request: Request) -> Response:
    svc = service(request)
    key = await authenticate(svc.store, request)
    body = await read_json(request, svc.settings.max_body_bytes)
    job = await svc.submit(request, key, model, body)
    return JSONResponse({"request_id": job.id, "status": job.state.value, **links(svc, request, job)})


async def polled_job(request: Request, request_id: str) -> tuple[Service, Job]:
    """The caller's job for the two poll routes; a FAILED one is raised as 422."""
    svc = service(request)
    key = await authenticate(svc.store, request)
    job = await own_job(svc, key, request_id)
    if job.state == JobState.FAILED:
        raise failed(job)
    return svc, job


async def live_status(svc: Service, job: Job) -> dict[str, Any]:
    position = await svc.store.queue_position(job.id) if job.state == JobState.QUEUED else None
    return status_body(job, position)


@router.get("/v2/requests/{request_id}/status", summary="Poll an async request")
async def request_status(request_id: str, request: Request) -> Response:
    svc, job = await polled_job(request, request_id)
    return JSONResponse(await live_status(svc, job))


@router.get("/v2/requests/{request_id}", summary="Fetch the result of an async request")
async def request_result(request_id: str, request: Request) -> Response:
    svc, job = await polled_job(request, request_id)
    if job.state != JobState.COMPLETED:
        return JSONResponse(await live_status(svc, job), status_code=202)
    return JSONResponse({
        "request_id": job.id,
        "status": job.state.value,
        "output": svc.output_urls(request, job),
        "seeds": job.seeds,
        "metrics": job.metrics,
        "input": job.params,
    })


@router.get("/v2/requests/{request_id}/outputs/{name}", summary="One output image (signed URL)")
async def request_output(request_id: str, name: str, request: Request) -> Response:
    svc = service(request)
    assert svc.signer is not None
    path = request.url.path
    signature = svc.signer.check(path, request.query_params.get("exp"), request.query_params.get("sig"))
    if signature == "expired":
        raise NotFound(f"unknown request: {request_id}")
    if signature == "bad":
        # No valid signature: the owner's key (or an admin's) still opens it.
        key = await authenticate(svc.store, request)
        await own_job(svc, key, request_id)
    index, _, ext = name.partition(".")
    if not index.isdigit() or ext not in CONTENT_TYPES:
        raise NotFound(f"unknown output: {name}")
    data = await svc.store.read_output(request_id, int(index))
    job = await svc.store.get(request_id)
    if data is None or job is None or job.ext != ext:
        raise NotFound(f"unknown output: {name}")
    return Response(data, media_type=CONTENT_TYPES[ext],
                    headers={"Cache-Control": "private, max-age=3600"})


@router.post("/v2/requests/{request_id}/cancel", summary="Cancel a queued or running request")
async def cancel_request(request_id: str, request: Request) -> Response:
    """A queued job ends FAILED "cancelled" at once (refunded); a running one stops at its next step."""
    svc = service(request)
    key = await authenticate(svc.store, request)
    job = await own_job(svc, key, request_id)
    if not job.state.terminal:
        job = await svc.store.request_cancel(job.id) or job
    body = status_body(job)
    body["cancel_requested"] = job.cancel_requested or job.error == "cancelled"
    return JSONResponse(body)
