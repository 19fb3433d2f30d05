"""Models, health, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse, Response

from kolors_api.api.deps import ServiceDep
from kolors_api.api.models import Health, ModelList, Ready, errors
from kolors_api.errors import Unavailable
from kolors_api.schema import IMG2IMG, MODELS, GenerateParams, json_schema, price

router = APIRouter()

#: The file `kolors-api tiny-model` writes into the folder it builds (`kolors_api.engine.tiny.MARKER`; that
#: module imports torch, which the API never does).
TINY_MARKER = "kolors-api-tiny.json"


def random_weights(model: str) -> bool:
    """Whether `--model` names test weights that draw noise: tiny, random:SIZE, or a folder tiny-model built."""
    from pathlib import Path

    if model == "tiny" or model.startswith("random:"):
        return True
    try:
        return (Path(model) / TINY_MARKER).is_file()
    except (OSError, ValueError):
        return False


@router.get("/v1/models", summary="List models with their parameter JSON Schema", response_model=ModelList)
async def list_models(svc: ServiceDep) -> Response:
    ip_adapter = bool(svc.settings.ip_adapter)
    seed_price = price(GenerateParams(prompt="x"), svc.settings.unit_price)
    img2img_price = price(GenerateParams(prompt="x", strength=0.75), svc.settings.unit_price)
    formula = "number_of_images * steps/25 * width*height/1024^2 * unit_price"
    data = [{
        "id": model, "object": "model", "owned_by": "Kwai-Kolors",
        "weights": svc.settings.model, "random_weights": random_weights(svc.settings.model),
        "parameters": json_schema(model, ip_adapter=ip_adapter),
        # which picture fields the model takes on this server (DESIGN.md §2 "Images in")
        "images": {"image": model == IMG2IMG, "ip_adapter_image": ip_adapter},
        "pricing": {"formula": formula.replace("steps", "int(steps*strength)") if model == IMG2IMG else formula,
                    "unit_price": svc.settings.unit_price,
                    "default_request": img2img_price if model == IMG2IMG else seed_price},
    } for model in MODELS]
    return JSONResponse({"object": "list", "data": data})


@router.get("/healthz", summary="Liveness", response_model=Health)
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: store reachable and a worker alive", response_model=Ready,
            responses=errors(503))
async def readyz(svc: ServiceDep) -> Response:
    if not await svc.store.ping():
        raise Unavailable("store unreachable", headers={"Retry-After": "5"})
    engines = svc.engines
    if engines is not None and not engines.ready:
        raise Unavailable(f"no engine ready: {engines.problem()}", headers={"Retry-After": "5"})
    stats = await svc.store.stats()
    if stats.workers_alive < 1:
        raise Unavailable("no worker alive", headers={"Retry-After": "5"})
    body: dict[str, Any] = {"status": "ready", "workers": stats.workers_alive, "queued": stats.queued}
    if engines is not None:
        body["engines"] = [engine.describe() for engine in engines.engines]
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(svc: ServiceDep) -> Response:
    stats = await svc.store.stats()
    m = svc.metrics
    m.queue_depth.set(stats.queued)
    m.processing.set(stats.processing)
    m.workers.set(stats.workers_alive)
    m.reclaims.set(stats.reclaims)
    m.dead_letters.set(stats.dead_letters)
    m.embedded_worker.set(svc.engines.ready if svc.engines is not None else 0)
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
