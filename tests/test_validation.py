"""Bad input gets a clear 4xx with an `error` body, and nothing is stored (API only, no worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kolors_api.errors import STATUS, STORE_ERRORS, KolorsAPIError, from_store
from kolors_api.schema import validate
from tests.conftest import LiveServer, start_server


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server("tiny", tmp_path_factory.mktemp("api-only"), extra=["--no-worker"], ready=False)
    yield srv
    srv.stop()


@pytest.fixture
def client(api_only: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_only.url, headers=api_only.headers(), timeout=30) as c:
        yield c


GOOD = {"prompt": "a cat", "steps": 2, "width": 512, "height": 512}

# (field, value, the words the error must carry)
BAD_VALUES = [
    ("cfg", -0.01, "cfg: must be between 0 and 20"),
    ("cfg", 20.01, "cfg: must be between 0 and 20"),
    ("cfg", "6", "cfg: must be a number"),
    ("cfg", True, "cfg: must be a number"),
    ("seed", -2, "seed: must be between 0 and 4294967295"),
    ("seed", 2**32, "seed: must be between 0 and 4294967295"),
    ("seed", 1.5, "seed: must be an integer"),
    ("steps", 0, "steps: must be between 1 and 50"),
    ("steps", 51, "steps: must be between 1 and 50"),
    ("steps", "25", "steps: must be an integer"),
    ("width", 504, "width: must be between 512 and 2048"),
    ("width", 2056, "width: must be between 512 and 2048"),
    ("width", 1003, "nearest valid: 1000 or 1008"),
    ("height", 1001, "height: must be a multiple of 8, got 1001 (nearest valid: 1000 or 1008)"),
    ("height", None, "height: must be an integer"),
    ("number_of_images", 0, "number_of_images: must be between 1 and 10"),
    ("number_of_images", 11, "number_of_images: must be between 1 and 10"),
    ("scheduler", "DDIM", "scheduler: must be one of"),
    ("output_format", "gif", "output_format: must be one of webp, jpg, png"),
    ("output_quality", -1, "output_quality: must be between 0 and 100"),
    ("output_quality", 101, "output_quality: must be between 0 and 100"),
    ("negative_prompt", "x" * 2001, "negative_prompt: must be at most 2000 characters"),
    ("negative_prompt", 5, "negative_prompt: must be a string"),
    ("prompt", "", "prompt: must not be empty"),
    ("prompt", "   \n ", "prompt: must not be empty"),
    ("prompt", "x" * 2001, "prompt: must be at most 2000 characters"),
    ("prompt", ["a"], "prompt: must be a string"),
]
GOOD_EDGES = [("cfg", 0), ("cfg", 20), ("seed", 0), ("seed", 2**32 - 1), ("steps", 1), ("steps", 50),
              ("width", 512), ("width", 2048), ("height", 2048), ("number_of_images", 10),
              ("output_quality", 0), ("output_quality", 100), ("prompt", "x" * 2000)]


def count_requests(client: httpx.Client) -> int:
    return len(client.get("/v1/requests", params={"limit": 100}).json()["data"])


@pytest.mark.parametrize(("field", "value", "words"), BAD_VALUES)
@pytest.mark.parametrize("route", ["/v1/kolors", "/v2/kolors"])
def test_out_of_range_and_wrong_types_are_400_naming_the_field(client: httpx.Client, route: str, field: str,
                                                                value: object, words: str) -> None:
    before = count_requests(client)
    r = client.post(route, json={**GOOD, field: value})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]
    assert count_requests(client) == before


@pytest.mark.parametrize(("field", "value"), GOOD_EDGES)
def test_every_range_edge_is_accepted(field: str, value: object) -> None:
    params = validate({**GOOD, field: value})
    assert getattr(params, field) == (value.strip() if isinstance(value, str) else value)


def test_output_format_jpeg_is_taken_as_jpg_as_the_openai_route_names_it(client: httpx.Client) -> None:
    assert validate({**GOOD, "output_format": "jpeg"}).output_format == "jpg"
    r = client.post("/v2/kolors", json={**GOOD, "output_format": "jpeg"})
    assert r.status_code == 200, r.text
    job = client.get(f"/v2/requests/{r.json()['request_id']}/status")
    assert job.status_code == 200
    r = client.post("/v2/kolors", json={**GOOD, "output_format": "gif"})
    assert (r.status_code, r.json()) == (400, {"error": "output_format: must be one of webp, jpg, png, got 'gif'"})


def test_an_authorization_header_without_bearer_says_how_to_send_the_key(api_only: LiveServer) -> None:
    for value in (api_only.key, f"Basic {api_only.key}"):
        r = httpx.post(api_only.url + "/v2/kolors", json=GOOD, headers={"Authorization": value})
        assert (r.status_code, r.json()) == (401, {"error": "the Authorization header must be `Bearer KEY`: send "
                                                            "the API key as `Authorization: Bearer KEY` or "
                                                            "`x-api-key: KEY`"})
    r = httpx.post(api_only.url + "/v2/kolors", json=GOOD, headers={"Authorization": f"Bearer {api_only.key}"})
    assert r.status_code == 200, r.text


def test_missing_prompt_and_unknown_fields_are_named(client: httpx.Client) -> None:
    r = client.post("/v2/kolors", json={"steps": 2})
    assert r.status_code == 400 and r.json()["error"] == "prompt: is required"
    r = client.post("/v2/kolors", json={**GOOD, "sampler": "x", "guidance": 3})
    assert r.status_code == 400 and r.json()["error"] == "guidance, sampler: unknown fields"


@pytest.mark.parametrize(("content", "words"), [
    (b"{not json", "body: not valid JSON"),
    (b"[1, 2]", "body: must be a JSON object, got array"),
    (b"\"a cat\"", "body: must be a JSON object, got string"),
    (b"", "body: must be a JSON object"),
    (b"{\"prompt\": \"x\", \"cfg\": NaN}", "cfg: must be a finite number, got nan"),
])
def test_malformed_bodies_are_400(client: httpx.Client, content: bytes, words: str) -> None:
    r = client.post("/v2/kolors", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and words in r.json()["error"]


def test_a_2_mib_body_is_413(client: httpx.Client) -> None:
    body = json.dumps({**GOOD, "prompt": "x" * (2 * 1024 * 1024)})
    r = client.post("/v2/kolors", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]


def test_a_chunked_body_over_the_limit_is_413_too(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = client.post("/v2/kolors", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "kol_wrong"}, {"authorization": "Bearer nope"},
                                     {"authorization": "Basic abc"}])
def test_missing_or_unknown_key_is_401(api_only: LiveServer, headers: dict[str, str]) -> None:
    r = httpx.post(api_only.url + "/v2/kolors", json=GOOD, headers=headers)
    assert r.status_code == 401 and "API key" in r.json()["error"]


def test_bearer_auth_is_accepted(api_only: LiveServer) -> None:
    r = httpx.get(api_only.url + "/v1/account", headers={"authorization": f"Bearer {api_only.key}"})
    assert r.status_code == 200 and r.json()["admin"] is True


def test_unknown_model_route_and_request_are_404(client: httpx.Client) -> None:
    r = client.post("/v1/sdxl", json=GOOD)
    assert r.status_code == 404 and r.json()["error"] == "unknown model: sdxl"
    r = client.get("/v2/requests/0123456789abcdef/status")
    assert r.status_code == 404 and "unknown request" in r.json()["error"]
    r = client.get("/v2/requests/0123456789abcdef")
    assert r.status_code == 404
    r = client.get("/no/such/route")
    assert r.status_code == 404 and "error" in r.json()


def test_the_error_table_maps_every_exception_to_its_status() -> None:
    assert STATUS[KolorsAPIError] == 500
    # 422 twice: a FAILED job, and an Idempotency-Key used with another body
    assert sorted(STATUS.values()) == [400, 401, 403, 404, 406, 409, 413, 422, 422, 429, 500, 503, 504]


def test_every_store_outcome_maps_to_one_api_error() -> None:
    import kolors_api.jobs as jobs

    outcomes = {cls for cls in vars(jobs).values()
                if isinstance(cls, type) and issubclass(cls, jobs.StoreError) and cls is not jobs.StoreError}
    assert outcomes == set(STORE_ERRORS), "every store outcome has its row in errors.STORE_ERRORS"
    samples = [(jobs.InsufficientFunds(1.0, 0.5), 406), (jobs.TooManyRunning(2), 429),
               (jobs.QueueFull("queue is full"), 503), (jobs.AlreadyExists("key k"), 409),
               (jobs.IdempotencyMismatch(), 422)]
    for exc, status in samples:
        err = from_store(exc)
        assert err.status == status and err.message == str(exc)
    assert from_store(jobs.TooManyRunning(2)).headers["Retry-After"] == "1"
    assert from_store(jobs.QueueFull("x")).headers["Retry-After"] == "5"
    assert from_store(jobs.StoreError("unnamed")).status == 500


def test_models_lists_kolors_with_its_schema(client: httpx.Client) -> None:
    r = client.get("/v1/models")
    model = r.json()["data"][0]
    assert model["id"] == "kolors"
    props = model["parameters"]["properties"]
    assert props["steps"]["maximum"] == 50 and props["width"]["multipleOf"] == 8
    assert model["pricing"]["default_request"] == 1.0


def test_a_sync_request_without_any_worker_is_503_and_not_queued(client: httpx.Client) -> None:
    before = count_requests(client)
    r = client.post("/v1/kolors", json=GOOD)
    assert r.status_code == 503 and r.json()["error"] == "no worker alive" and r.headers["retry-after"]
    assert count_requests(client) == before


def test_readyz_is_503_without_a_worker_and_healthz_is_200(api_only: LiveServer) -> None:
    assert httpx.get(api_only.url + "/healthz").status_code == 200
    r = httpx.get(api_only.url + "/readyz")
    assert r.status_code == 503 and r.json()["error"] == "no worker alive" and r.headers["retry-after"]


def test_metrics_count_requests_by_route_and_status(client: httpx.Client) -> None:
    client.post("/v2/kolors", json={"steps": 2})
    text = client.get("/metrics").text
    assert 'kolors_http_requests_total{method="POST",route="/v2/{model}",status="400"}' in text
    assert "kolors_queue_depth" in text and "kolors_job_duration_seconds" in text


def test_the_api_package_imports_no_torch() -> None:
    code = ("import sys, kolors_api.api.app, kolors_api.cli, kolors_api.worker; "
            "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_stack_trace_in_error_bodies(client: httpx.Client) -> None:
    for r in (client.post("/v2/kolors", content=b"\xff\xfe"), client.post("/v1/kolors", json=[{}] * 3)):
        assert r.status_code == 400
        assert "Traceback" not in r.text and "File \"" not in r.text


def test_data_dir_holds_the_signing_secret(api_only: LiveServer) -> None:
    secret = Path(api_only.data_dir) / "secret.key"
    assert secret.exists() and len(secret.read_bytes()) == 32


def test_the_admin_bodies_name_exactly_the_fields_a_store_changes() -> None:
    from kolors_api.api.models import KeyCreate, KeyUpdate
    from kolors_api.jobs import KEY_FIELDS

    assert set(KeyUpdate.model_fields) == set(KEY_FIELDS) | {"credits", "add_credits"}
    assert set(KeyCreate.model_fields) == set(KEY_FIELDS) - {"enabled"} | {"credits"}
