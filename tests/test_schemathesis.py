"""Property-based fuzzing of the live API from its own OpenAPI schema (schemathesis), as an admin.

The schema is the one the app serves: it declares every request body (the Segmind body from the
parameter table, the OpenAI and admin bodies from their pydantic models), the query parameters the
routes read, and the response of every route, so the fuzzer reaches validation, pricing and the key
routes, and the response-conformance check compares each answer with its declared shape.

The server runs without a worker (`--no-worker`), so two 503s are by design and allowed: `/readyz`
and a valid sync request ("no worker alive"). Any other 5xx fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import response_schema_conformance

from kolors_api.api.app import create_app
from kolors_api.schema import json_schema
from kolors_api.settings import Settings
from tests.conftest import ADMIN_KEY, LiveServer, start_server

SYNC_ROUTES = {"/v1/{model}", "/v1/images/generations"}
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


#: The 503 of a sync route with no worker: Segmind's shape, and OpenAI's on the OpenAI route.
NO_WORKER = [{"error": "no worker alive"},
             {"error": {"message": "no worker alive", "type": "server_error", "param": None,
                        "code": "service_unavailable"}}]


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """Like schemathesis' not_a_server_error, less the 503s a worker-less server gives by design."""
    if response.status_code < 500:
        return None
    path = case.operation.path
    by_design = response.status_code == 503 and "retry-after" in {k.lower() for k in response.headers} and (
        path == "/readyz" or (path in SYNC_ROUTES and response.json() in NO_WORKER))
    if by_design:
        return None
    raise AssertionError(f"{case.operation.label}: {response.status_code} {response.text[:300]}")


CHECKS = [no_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server("tiny", tmp_path_factory.mktemp("fuzz"), extra=["--no-worker"], ready=False)
    yield server
    server.stop()


#: The schema as the app builds it; a test below checks that the live server serves exactly this.
#: (Built here, not fetched in a fixture, because schemathesis' lazy `from_fixture` loader does not
#: work with pytest 9: it sets `request.node._nodeid`, which pytest 9 no longer has.)
SERVED: dict[str, Any] = create_app(Settings(worker=False)).openapi()
served_api = schemathesis.openapi.from_dict(SERVED)


def test_the_live_server_serves_this_schema(srv: LiveServer) -> None:
    r = httpx.get(srv.url + "/openapi.json")
    assert r.status_code == 200 and r.json() == SERVED


def _body(path: str, method: str) -> dict[str, Any]:
    schema: dict[str, Any] = SERVED["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return schema


def test_the_schema_declares_every_body_the_routes_read() -> None:
    assert _body("/v1/{model}", "post") == _body("/v2/{model}", "post") == json_schema()
    assert _body("/v1/admin/keys", "post")["required"] == ["name"]
    assert {"add_credits", "enabled"} <= set(_body("/v1/admin/keys/{key_id}", "patch")["properties"])
    assert {"prompt", "n", "size", "response_format"} <= set(_body("/v1/images/generations", "post")["properties"])
    limit = [p for p in SERVED["paths"]["/v1/requests"]["get"]["parameters"] if p["name"] == "limit"]
    assert limit and limit[0]["schema"]["maximum"] == 100


def test_every_route_declares_its_answers() -> None:
    for path, ops in SERVED["paths"].items():
        for method, op in ops.items():
            ok = op["responses"].get("200") or op["responses"].get("201")
            assert ok and ok.get("content"), f"{method.upper()} {path} declares no answer"
            if path not in ("/healthz", "/metrics", "/v1/models"):
                assert any(code.startswith("4") or code.startswith("5") for code in op["responses"]), path


#: Every operation of the schema, one test each: distinct test ids (schemathesis' own `parametrize`
#: gives its items one id, and pytest-xdist then runs only one of them).
OPERATIONS = [(path, method) for path, ops in SERVED["paths"].items() for method in ops]


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_the_served_schema_holds_under_fuzzing(path: str, method: str, srv: LiveServer) -> None:
    operation = served_api[path][method.upper()]

    @FUZZ
    @given(case=operation.as_strategy())
    def fuzz(case: Any) -> None:
        case.call_and_validate(base_url=srv.url, headers={"x-api-key": ADMIN_KEY}, checks=CHECKS)

    fuzz()
