"""The async submit's fast path (`api/fastpath.py`) answers byte for byte as the FastAPI route does."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from kolors_api.api.app import create_app, error_response
from kolors_api.api.deps import request_base_url
from kolors_api.api.fastpath import SubmitFastPath, submit_route
from kolors_api.api.generation import router as generation_router
from kolors_api.jobs.ids import new_job_id
from kolors_api.settings import Settings
from tests.conftest import ADMIN_KEY

SMALL = {"prompt": "a fox", "steps": 2, "width": 512, "height": 512, "seed": 7}
ID = re.compile(r"[0-9a-f]{32}")


def app_client(data_dir: Path, *, fast: bool) -> TestClient:
    settings = Settings(worker=False, data_dir=data_dir, bootstrap_key=ADMIN_KEY, allowed_hosts="testserver",
                        max_body_bytes=4096)
    return TestClient(create_app(settings, fast_submit=fast), raise_server_exceptions=False)


def exchange(client: TestClient) -> list[tuple[int, list[tuple[str, str]], str]]:
    """Every kind of answer `POST /v2/{model}` gives, the job ids numbered in order of appearance."""
    admin = {"x-api-key": ADMIN_KEY}
    limited = client.post("/v1/admin/keys", headers=admin, json={"name": "slow", "rate_limit": "2/min"}).json()
    poor = client.post("/v1/admin/keys", headers=admin, json={"name": "poor", "credits": 0.001}).json()
    off = client.post("/v1/admin/keys", headers=admin, json={"name": "off"}).json()
    client.patch(f"/v1/admin/keys/{off['id']}", headers=admin, json={"enabled": False})
    requests: list[dict[str, Any]] = [
        {"json": SMALL, "headers": admin},
        {"json": SMALL, "headers": {"authorization": f"Bearer {ADMIN_KEY}"}},
        {"json": SMALL},
        {"json": SMALL, "headers": {"x-api-key": "kol_nope"}},
        {"json": SMALL, "headers": {"authorization": "Basic abc"}},
        {"json": SMALL, "headers": {"x-api-key": off["key"]}},
        {"json": SMALL, "headers": {"x-api-key": poor["key"]}},
        {"content": b"{not json", "headers": admin},
        {"content": b"{not json"},
        {"content": b"", "headers": admin},
        {"content": b"[1, 2]", "headers": admin},
        {"content": json.dumps({**SMALL, "prompt": "x" * 5000}).encode(), "headers": admin},
        {"json": {**SMALL, "steps": 0}, "headers": admin},
        {"json": {**SMALL, "webhook": "http://127.0.0.1:1/hook"}, "headers": admin},
        {"json": SMALL, "headers": {**admin, "idempotency-key": "one"}},
        {"json": SMALL, "headers": {**admin, "idempotency-key": "one"}},
        {"json": {**SMALL, "seed": 8}, "headers": {**admin, "idempotency-key": "one"}},
        {"json": SMALL, "headers": {**admin, "idempotency-key": "x" * 256}},
        {"json": SMALL, "headers": {**admin, "host": "evil.example"}},
        {"json": SMALL, "headers": {"x-api-key": limited["key"]}},
        {"json": SMALL, "headers": {"x-api-key": limited["key"]}},
        {"json": SMALL, "headers": {"x-api-key": limited["key"]}},
    ]
    answers = [("/v2/kolors", r) for r in requests] + [("/v2/sdxl", {"json": SMALL, "headers": admin}),
                                                        ("/v2/kolors/", {"json": SMALL, "headers": admin})]
    seen: dict[str, str] = {}

    def number(text: str) -> str:
        return ID.sub(lambda m: seen.setdefault(m[0], f"<job {len(seen)}>"), text)

    out = []
    for path, kwargs in answers:
        r = client.post(path, **kwargs)
        out.append((r.status_code, [(k, number(v)) for k, v in r.headers.items()], number(r.text)))
    return out


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    with app_client(tmp_path / "fast", fast=True) as fast, app_client(tmp_path / "route", fast=False) as route:
        yield fast, route


def test_the_fast_path_answers_every_submit_as_the_fastapi_route(both: tuple[TestClient, TestClient]) -> None:
    fast, route = both
    got, want = exchange(fast), exchange(route)
    assert [status for status, _, _ in want] == [200, 200, 401, 401, 401, 403, 406, 400, 401, 400, 400, 413, 400, 400,
                                                 200, 200, 422, 400, 400, 200, 200, 429, 404, 200]
    for one, other in zip(got, want, strict=True):
        assert one == other


def test_the_fast_path_answers_post_v2_model_itself_and_passes_the_rest_on(tmp_path: Path) -> None:
    with app_client(tmp_path, fast=True) as client:
        svc = client.app.state.service  # type: ignore[attr-defined]
        passed: list[str] = []

        async def rest(scope: Scope, receive: Receive, send: Send) -> None:
            passed.append(f"{scope['method']} {scope['path']}")
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        route = submit_route(generation_router.routes)
        fast = TestClient(SubmitFastPath(rest, svc, route, error_response))
        answer = fast.post("/v2/kolors", json=SMALL, headers={"x-api-key": ADMIN_KEY})
        assert answer.status_code == 200 and answer.json()["status"] == "QUEUED"
        assert fast.post("/v2/kolors", json=SMALL).status_code == 401
        for method, path in (("GET", "/v2/kolors"), ("POST", "/v2/kolors/x"), ("POST", "/v2/"),
                             ("POST", "/v1/kolors"), ("POST", "/v2/requests/abc/cancel")):
            assert fast.request(method, path).status_code == 204
        assert passed == ["GET /v2/kolors", "POST /v2/kolors/x", "POST /v2/", "POST /v1/kolors",
                          "POST /v2/requests/abc/cancel"]


@pytest.mark.parametrize("scope", [
    {"headers": [(b"host", b"api.example:8443")], "scheme": "https", "server": ("10.0.0.1", 8000)},
    {"headers": [(b"host", b"[::1]:8000")], "server": ("::1", 8000)},
    {"headers": [(b"host", b"bad host:x")], "server": ("127.0.0.1", 80)},
    {"headers": [], "server": ("::1", 8000), "root_path": "/api"},
    {"headers": [], "scheme": "https", "server": ("example.org", 443), "app_root_path": "/a", "root_path": "/a/b"},
    {"headers": [(b"x-other", b"1"), (b"host", b"one"), (b"host", b"two")], "server": None},
])
def test_the_remembered_base_url_is_starlettes(scope: dict[str, Any]) -> None:
    request = Request({"type": "http", "path": "/v2/kolors", "query_string": b"a=1", **scope})
    assert request_base_url(request) == str(Request(dict(request.scope)).base_url).rstrip("/")
    assert request_base_url(request) == request_base_url(Request(dict(request.scope)))  # the second time from the cache


def test_job_ids_are_uuid4_hex_unique_and_a_forked_child_draws_its_own() -> None:
    ids = [new_job_id() for _ in range(3 * 256)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(hex=i).hex == i and uuid.UUID(hex=i).version == 4 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what it draws must not be what the parent draws next
        os.write(write, new_job_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 64).decode() != new_job_id()
