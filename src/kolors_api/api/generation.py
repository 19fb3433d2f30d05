"""Segmind's wire: `POST /v1/{model}` (sync), `POST /v2/{model}` (async) and the v2 request routes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from kolors_api.api.auth import authenticate, presented_key
from kolors_api.api.deps import CallerKey, JsonBody, Service, ServiceDep, failed
from kolors_api.api.models import (
    CancelBody,
    ErrorBody,
    ResultBody,
    StatusBody,
    Submitted,
    SyncImages,
    WebhookAttempts,
    errors,
    submit_request,
)
from kolors_api.errors import Forbidden, NotFound, Unauthorized
from kolors_api.jobs import Job, JobState
from kolors_api.jobs.revoke import key_is_live
from kolors_api.schema import CONTENT_TYPES, MODELS, clip, decimal, json_schema, short

router = APIRouter()

#: The Segmind request body, declared from the parameter table (the routes validate it themselves).
KOLORS_BODY = submit_request(json_schema())
IMAGE = {"content": {ct: {"schema": {"type": "string", "format": "binary"}} for ct in CONTENT_TYPES.values()}}


def steps_run(params: dict[str, Any]) -> int:
    """The steps a job's record says it runs: steps, or int(steps × strength) for image to image."""
    steps = int(params.get("steps", 0))
    return steps if params.get("strength") is None else max(1, int(steps * float(params["strength"])))


def status_body(job: Job, position: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": job.id, "status": job.state.value}
    if job.state == JobState.QUEUED and position is not None:
        body["queue_position"] = position
    if job.state == JobState.PROCESSING:
        body["progress"] = progress_of(job)
    if job.attempt > 1 and not job.state.terminal:
        body["attempt"] = job.attempt  # delivered again: its worker was lost
    if job.state == JobState.FAILED:
        body["error"] = job.error or "failed"
    return body


def progress_of(job: Job) -> dict[str, Any]:
    """A PROCESSING job's `progress`: step, total_steps and phase (denoising, decoding, encoding, storing)."""
    return {"step": job.step, "total_steps": job.total_steps or steps_run(job.params),
            "phase": job.phase or "denoising"}


def result_body(svc: Service, request: Request | None, job: Job) -> dict[str, Any]:
    """The body of a COMPLETED job's result (output URLs signed; absolute from PUBLIC_URL or `request`)."""
    return {"request_id": job.id, "status": job.state.value, "output": svc.output_urls(request, job),
            "seeds": job.seeds, "metrics": job.metrics, "input": job.params}


def webhook_body(svc: Service, job: Job) -> dict[str, Any]:
    """What a webhook delivery sends: the result body once COMPLETED, else the status body."""
    return result_body(svc, None, job) if job.state == JobState.COMPLETED else status_body(job)


#: The model path parameter: `kolors` is the one model (any other name is a 404 naming it).
ModelName = Annotated[str, Path(description="the model slug", json_schema_extra={"enum": list(MODELS)})]


def request_id_header(job: Job) -> dict[str, str]:
    """`X-Request-Id`: every answer about an accepted job names it in a header too."""
    return {"X-Request-Id": job.id}


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


SYNC_ERRORS = errors(400, 401, 403, 404, 406, 413, 422, 429, 503, 504)


@router.post("/v1/{model}", summary="Generate and return the image(s) (sync)", openapi_extra=KOLORS_BODY,
             response_model=SyncImages, responses={200: IMAGE, **SYNC_ERRORS})
async def generate_sync(model: ModelName, request: Request, svc: ServiceDep, key: CallerKey,
                        body: JsonBody) -> Response:
    done = await svc.run_sync(request, key, model, body)
    job = done.job
    headers = {
        "X-Request-Id": job.id,
        "X-Seed": str(job.seeds[0] if job.seeds else job.params["seed"]),
        "X-Inference-Time": f"{job.metrics.get('inference_time', 0.0):.4f}",
    }
    if len(done.images) == 1 and not wants_json(request):
        return Response(done.images[0], media_type=CONTENT_TYPES[job.ext], headers=headers)
    return JSONResponse({"request_id": job.id, "images": done.b64(), "seeds": job.seeds, "metrics": job.metrics},
                        headers=headers)


@router.post("/v2/{model}", summary="Submit an async request", openapi_extra=KOLORS_BODY,
             response_model=Submitted, responses=errors(400, 401, 403, 404, 406, 413, 422, 429, 503))
async def submit_async(model: ModelName, request: Request, svc: ServiceDep, key: CallerKey, body: JsonBody) -> Response:
    # `api/fastpath.py` answers this route without FastAPI's dependency solving: change both together
    return submitted(svc, request, await svc.submit(request, key, model, body))


def submitted(svc: Service, request: Request, job: Job) -> Response:
    """The answer to an async submit; the same for a repeated Idempotency-Key (`Idempotent-Replayed:
    true`), whatever the job did since."""
    return JSONResponse({"request_id": job.id, "status": JobState.QUEUED.value, **svc.links(request, job)},
                        headers=request_id_header(job))


async def live_status(svc: ServiceDep, job: Job) -> dict[str, Any]:
    """The status body with the queue position of a QUEUED job; a FAILED one is raised as 422."""
    if job.state == JobState.FAILED:
        raise failed(job)
    position = await svc.store.queue_position(job.id) if job.state == JobState.QUEUED else None
    return status_body(job, position)


@router.get("/v2/requests/{request_id}/status", summary="Poll an async request", response_model=StatusBody,
            responses=errors(401, 403, 404, 422))
async def request_status(request_id: str, svc: ServiceDep, key: CallerKey) -> Response:
    job = await svc.own_job(key, request_id)
    return JSONResponse(await live_status(svc, job), headers=request_id_header(job))


@router.get("/v2/requests/{request_id}", summary="Fetch the result of an async request", response_model=ResultBody,
            responses={202: {"model": StatusBody, "description": "still running"}, **errors(401, 403, 404, 422)})
async def request_result(request_id: str, request: Request, svc: ServiceDep, key: CallerKey) -> Response:
    job = await svc.own_job(key, request_id)
    if job.state != JobState.COMPLETED:
        return JSONResponse(await live_status(svc, job), status_code=202, headers=request_id_header(job))
    return JSONResponse(result_body(svc, request, job), headers=request_id_header(job))


@router.get("/v2/requests/{request_id}/webhooks", summary="The webhook delivery attempts of a request",
            response_model=WebhookAttempts, responses=errors(401, 403, 404))
async def request_webhooks(request_id: str, svc: ServiceDep, key: CallerKey) -> Response:
    """Every try of every delivery, oldest first: time, event, HTTP status, latency, error."""
    job = await svc.own_job(key, request_id)
    return JSONResponse({"request_id": job.id, "data": [a.to_dict() for a in await svc.store.webhook_attempts(job.id)]})


@router.get("/v2/requests/{request_id}/outputs/{name}", summary="One output image (signed URL)",
            responses={200: IMAGE, 302: {"description": "with KOLORS_API_BLOB_REDIRECT=1: a presigned GET on the "
                                                        "object store"},
                       401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody},
                       503: {"model": ErrorBody}},
            openapi_extra={"parameters": [{"name": "exp", "in": "query", "schema": {"type": "string"}},
                                          {"name": "sig", "in": "query", "schema": {"type": "string"}}]})
async def request_output(request_id: str, name: str, request: Request, svc: ServiceDep) -> Response:
    assert svc.signer is not None
    signature = svc.signer.check(request.url.path, request.query_params.get("exp"), request.query_params.get("sig"))
    if signature == "expired":
        raise NotFound(f"unknown request: {clip(request_id)}")
    if signature == "bad":
        # No valid signature: the owner's key (or an admin's) still opens it.
        if presented_key(request) is None:
            what = "invalid output URL signature" if request.query_params.get("sig") else "unsigned output URL"
            raise Unauthorized(f"{what}: use the URL from the result as it is (with exp and sig), or send the "
                               f"owner's API key")
        await svc.own_job(await authenticate(svc.store, request), request_id)
    job = await svc.store.get(request_id)
    if job is not None and not await key_is_live(svc.store, job.key_id):
        raise Forbidden("the API key of this request is disabled or deleted: its outputs are not served")
    stem, _, ext = name.partition(".")
    index = decimal(stem, 3)
    if index is None or ext not in CONTENT_TYPES:
        raise NotFound(f"unknown output: {short(name)}")
    if svc.settings.blob_redirect:
        # a presigned GET on the object store, valid no longer than the result is kept (None: the
        # images are not on an object store, or there is no such output; streamed or 404 below)
        url = await svc.store.output_url(request_id, index)
        job = await svc.store.get(request_id)
        if url is not None and job is not None and job.ext == ext:
            return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
    data = await svc.store.read_output(request_id, index)
    job = await svc.store.get(request_id)
    if data is None or job is None or job.ext != ext:
        raise NotFound(f"unknown output: {short(name)}")
    return Response(data, media_type=CONTENT_TYPES[ext], headers={"Cache-Control": "private, max-age=3600"})


@router.post("/v2/requests/{request_id}/cancel", summary="Cancel a queued or running request",
             response_model=CancelBody, responses=errors(401, 403, 404))
async def cancel_request(request_id: str, svc: ServiceDep, key: CallerKey) -> Response:
    """A queued job ends FAILED "cancelled" at once (refunded); a running one stops at its next step."""
    job = await svc.own_job(key, request_id)
    if not job.state.terminal:
        job = await svc.store.request_cancel(job.id) or job
    body = status_body(job)
    body["cancel_requested"] = job.cancel_requested or job.error == "cancelled"
    return JSONResponse(body, headers=request_id_header(job))
