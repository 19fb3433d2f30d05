"""What the second adversarial probe broke (issue 21), one battery per class, against live servers
on loopback (no worker): numbers beyond float range in every numeric field of every route (400
naming the field, never a 500), echoed values cut to about 100 characters, a percent-encoded `sig`
in the access log, and forwarded headers from a client nobody trusted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kolors_api.schema import validate
from tests.conftest import LiveServer, start_server

HUGE = "9" * 400  # beyond float range (≈1.8e308), within JSON's 4300-digit limit
#: Hostile JSON numerals and near-numbers, as raw JSON text: each must be a 4xx naming the field.
HOSTILE = [HUGE, "-" + HUGE, "1" + "0" * 4000, "1e400", "-1e400", "1.7976931348623157e308", "-1e308",
           "NaN", "Infinity", "-Infinity", '"nan"', '"-0"', '"1e400"', '"' + HUGE + '"']
#: Values that are fine wherever 0 is (JSON's -0 is the number 0).
ZEROISH = ["-0", "-0.0", "0e0"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server("tiny", tmp_path_factory.mktemp("probe"), extra=["--no-worker"], ready=False)
    yield server
    server.stop()
    assert "Traceback" not in server.log(), "a bad input must never log a traceback"


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = spec
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return resolve(spec, node)


def is_numeric(spec: dict[str, Any], schema: dict[str, Any]) -> bool:
    schema = resolve(spec, schema)
    if schema.get("type") in ("number", "integer"):
        return True
    return any(is_numeric(spec, s) for s in schema.get("anyOf", []) + schema.get("oneOf", []))


def numeric_fields(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(method, path, field) for every numeric field of every JSON request body in the OpenAPI schema."""
    found = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is None:
                continue
            for name, prop in resolve(spec, body).get("properties", {}).items():
                if is_numeric(spec, prop):
                    found.append((method.upper(), path, name))
    return found


def test_every_numeric_field_is_found(srv: LiveServer) -> None:
    fields = numeric_fields(httpx.get(srv.url + "/openapi.json").json())
    for wanted in [("POST", "/v1/{model}", "cfg"), ("POST", "/v2/{model}", "seed"),
                   ("POST", "/v1/images/generations", "cfg"), ("POST", "/v1/images/generations", "n"),
                   ("POST", "/v1/admin/keys", "credits"), ("POST", "/v1/admin/keys", "max_concurrency"),
                   ("PATCH", "/v1/admin/keys/{key_id}", "add_credits")]:
        assert wanted in fields


def base_body(path: str) -> dict[str, Any]:
    if path.startswith("/v1/admin/keys"):
        return {} if "{key_id}" in path else {"name": "n"}
    if path == "/v1/images/generations":
        return {"prompt": "a fox", "steps": 1, "size": "512x512"}
    return {"prompt": "a fox", "steps": 1, "width": 512, "height": 512}


def send(srv: LiveServer, method: str, path: str, field: str, raw: str, key_id: str) -> httpx.Response:
    url = srv.url + path.replace("{model}", "kolors").replace("{key_id}", key_id)
    body = base_body(path)
    text = "{" + ", ".join([*(f'"{k}": {json.dumps(v)}' for k, v in body.items()), f'"{field}": {raw}']) + "}"
    return httpx.request(method, url, content=text, timeout=30,
                         headers={**srv.headers(), "content-type": "application/json"})


def message(r: httpx.Response) -> str:
    error = r.json()["error"]
    return str(error["message"] if isinstance(error, dict) else error)


def test_hostile_numbers_in_every_numeric_field_are_400_naming_the_field(srv: LiveServer) -> None:
    spec = httpx.get(srv.url + "/openapi.json").json()
    key_id = srv.create_key()["id"]
    before = httpx.get(srv.url + "/v1/requests", params={"limit": 100}, headers=srv.headers()).json()["data"]
    for method, path, field in numeric_fields(spec):
        for raw in HOSTILE:
            r = send(srv, method, path, field, raw, key_id)
            assert r.status_code == 400, (method, path, field, raw[:20], r.status_code, r.text[:300])
            text = message(r)
            # the field is named (the OpenAI route may name the Kolors field it maps to, with `param`)
            named = text.startswith(f"{field}: ") or (isinstance(r.json()["error"], dict)
                                                      and r.json()["error"]["param"] == field)
            assert named, (path, field, raw[:20], text)
            assert len(text) < 300, (path, field, raw[:20], len(text), text)  # an echo is cut at ~100
        for raw in ZEROISH:
            r = send(srv, method, path, field, raw, key_id)
            # 0 is in range or it is not: either way a clear answer, never a 500
            assert r.status_code < 500 or message(r) == "no worker alive", (path, field, raw, r.text[:300])
    after = httpx.get(srv.url + "/v1/requests", params={"limit": 100}, headers=srv.headers()).json()["data"]
    # only the ZEROISH submits of the v2 route may have queued a job (cfg, seed and ip_adapter_scale accept 0)
    assert len(after) - len(before) <= 3 * len(ZEROISH)


def test_a_negative_zero_is_stored_as_zero(srv: LiveServer) -> None:
    r = httpx.post(srv.url + "/v1/admin/keys", content='{"name": "z", "credits": -0.0}',
                   headers={**srv.headers(), "content-type": "application/json"})
    assert r.status_code == 201 and str(r.json()["credits"]) == "0.0", r.text
    assert math.copysign(1.0, validate(json.loads('{"prompt": "a fox", "cfg": -0.0}')).cfg) == 1.0


@pytest.mark.parametrize("field", ["steps", "seed", "width", "number_of_images", "output_quality"])
def test_a_range_error_quotes_about_100_characters_of_a_huge_number(srv: LiveServer, field: str) -> None:
    r = send(srv, "POST", "/v2/{model}", field, HUGE, "")
    assert r.status_code == 400
    text = message(r)
    assert text.startswith(f"{field}: must be between ") and text.endswith("…"), text
    assert len(text) < 160, (len(text), text)


# -- 14. the access log never holds a signature, however its name is spelled
@pytest.mark.parametrize("name", ["%73ig", "si%67", "%73%69%67", "s%69g", "sig"])
def test_the_access_log_drops_a_percent_encoded_signature(srv: LiveServer, name: str) -> None:
    secret = "5ec4e7" + name.replace("%", "") * 4 + "f00d" * 8
    r = httpx.get(f"{srv.url}/v2/requests/abc/outputs/0.webp?exp=1900000000&{name}={secret}&x=1")
    # the server reads the encoded name as `sig` (an invalid one: 401 without a key, not "unsigned")
    assert r.status_code == 401 and "invalid output URL signature" in message(r), r.text
    log = srv.log()
    assert secret not in log
    assert "/v2/requests/abc/outputs/0.webp?exp=1900000000&x=1 HTTP/1.1" in log


# -- 17. X-Forwarded-* only from the proxies named in KOLORS_API_FORWARDED_ALLOW_IPS
FORWARDED = {"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7"}


def links_and_log(server: LiveServer) -> tuple[str, str]:
    r = httpx.post(server.url + "/v2/kolors", json={"prompt": "a fox"}, headers={**server.headers(), **FORWARDED})
    assert r.status_code == 200, r.text
    return r.json()["status_url"], server.log()


def test_forwarded_headers_from_loopback_are_ignored_by_default(srv: LiveServer) -> None:
    status_url, log = links_and_log(srv)
    assert status_url.startswith(srv.url + "/v2/requests/"), status_url
    assert "203.0.113.7" not in log


def test_forwarded_headers_are_believed_from_an_allowed_proxy(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path, extra=["--no-worker"], ready=False,
                         env={"KOLORS_API_FORWARDED_ALLOW_IPS": "127.0.0.1"})
    try:
        status_url, log = links_and_log(server)
        assert status_url.startswith("https://127.0.0.1:"), status_url
        assert "203.0.113.7" in log
    finally:
        server.stop()


def test_forwarded_headers_from_a_client_not_in_the_list_are_ignored(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path, extra=["--no-worker"], ready=False,
                          env={"KOLORS_API_FORWARDED_ALLOW_IPS": "10.0.0.0/8, 192.0.2.1"})
    try:
        status_url, log = links_and_log(server)
        assert status_url.startswith(server.url + "/v2/requests/"), status_url
        assert "203.0.113.7" not in log
    finally:
        server.stop()


def test_a_bad_forwarded_allow_ips_stops_start_up(tmp_path: Path) -> None:
    from kolors_api.settings import Settings

    with pytest.raises(ValueError, match="forwarded_allow_ips"):
        Settings(forwarded_allow_ips="10.0.0.0/8,proxy.example")
