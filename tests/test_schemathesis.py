"""Property-based fuzzing of the live API from its own OpenAPI schema (schemathesis), as an admin.

Two schemas: the one `/openapi.json` serves, and the same one with the request bodies and query
parameters that our routes read by hand (they take a raw `Request`, so FastAPI cannot declare them),
so that the fuzzer reaches validation, pricing and the key routes instead of stopping at "no body".

Checks: no server error, and every response matches the schema where the schema declares one. The
server runs without a worker (`--no-worker`), so two 503s are by design and allowed: `/readyz` and
a valid sync request ("no worker alive"). Any other 5xx fails.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from kolors_api.api import create_app  # noqa: E402
from kolors_api.schema import json_schema  # noqa: E402
from kolors_api.settings import Settings  # noqa: E402
from tests.conftest import ADMIN_KEY, LiveServer, start_server  # noqa: E402

SYNC_ROUTES = {"/v1/{model}", "/v1/images/generations"}
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """Like schemathesis' not_a_server_error, less the 503s a worker-less server gives by design."""
    if response.status_code < 500:
        return None
    path = case.operation.path
    by_design = response.status_code == 503 and "retry-after" in {k.lower() for k in response.headers} and (
        path == "/readyz" or (path in SYNC_ROUTES and response.json() == {"error": "no worker alive"}))
    if by_design:
        return None
    raise AssertionError(f"{case.operation.label}: {response.status_code} {response.text[:300]}")


CHECKS = [no_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server("tiny", tmp_path_factory.mktemp("fuzz"), extra=["--no-worker"], ready=False)
    yield server
    server.stop()


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


KEY_FIELDS = {
    "name": {"type": "string"},
    "credits": {"type": ["number", "null"]},
    "rate_limit": {"type": ["string", "null"]},
    "max_concurrency": {"type": ["integer", "null"]},
    "admin": {"type": "boolean"},
}
OPENAI_BODY = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string"},
        "n": {"type": "integer"},
        "size": {"type": "string"},
        "response_format": {"type": "string", "enum": ["b64_json", "url", "other"]},
        "output_format": {"type": "string"},
        "output_compression": {"type": "integer"},
        "steps": {"type": "integer"},
        "seed": {"type": "integer"},
    },
}


def with_bodies(served: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(served)
    paths = raw["paths"]
    kolors = json_schema()
    for route in ("/v1/{model}", "/v2/{model}"):
        op = paths[route]["post"]
        op["requestBody"] = json_body(kolors)
        for param in op["parameters"]:
            if param["name"] == "model":
                param["schema"] = {"type": "string", "enum": ["kolors", "sdxl"]}
    paths["/v1/images/generations"]["post"]["requestBody"] = json_body(OPENAI_BODY)
    paths["/v1/admin/keys"]["post"]["requestBody"] = json_body(
        {"type": "object", "required": ["name"], "properties": KEY_FIELDS})
    paths["/v1/admin/keys/{key_id}"]["patch"]["requestBody"] = json_body({"type": "object", "properties": {
        **KEY_FIELDS, "enabled": {"type": "boolean"}, "add_credits": {"type": "number"}}})
    paths["/v1/requests"]["get"]["parameters"] = [
        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    ]
    return raw


#: The schema as the app builds it; a test below checks that the live server serves exactly this.
#: (Built here, not fetched in a fixture, because schemathesis' lazy `from_fixture` loader does not
#: work with pytest 9: it sets `request.node._nodeid`, which pytest 9 no longer has.)
SERVED: dict[str, Any] = create_app(Settings(worker=False)).openapi()
served_api = schemathesis.openapi.from_dict(SERVED)
full_api = schemathesis.openapi.from_dict(with_bodies(SERVED))


def test_the_live_server_serves_this_schema(srv: LiveServer) -> None:
    r = httpx.get(srv.url + "/openapi.json")
    assert r.status_code == 200 and r.json() == SERVED


@served_api.parametrize()
@FUZZ
def test_the_served_schema_holds_under_fuzzing(case: Any, srv: LiveServer) -> None:
    case.call_and_validate(base_url=srv.url, headers={"x-api-key": ADMIN_KEY}, checks=CHECKS)


@full_api.parametrize()
@FUZZ
def test_the_schema_with_bodies_holds_under_fuzzing(case: Any, srv: LiveServer) -> None:
    case.call_and_validate(base_url=srv.url, headers={"x-api-key": ADMIN_KEY}, checks=CHECKS)
