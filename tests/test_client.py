"""`kolors_api.client` against a live server (a torch-free engine), FAILED jobs included (a prompt the
built-in content screen blocks ends FAILED); a MockTransport only where a live server on loopback
cannot stand in (a second host, for where the key is sent)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import kolors_api.client as kc
import kolors_api.client._client as client_module
from kolors_api.client import (
    APIError,
    AsyncClient,
    Client,
    InferenceFailed,
    InferenceTimeout,
    KolorsAPIError,
    SegmindError,
)
from tests.conftest import LiveServer
from tests.pixel_engines import pixel_server, server_gate


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The module's live server on the torch-free engine: here the client is the point, not the pixels."""
    yield from pixel_server(tmp_path_factory)

SMALL: dict[str, Any] = {"steps": 2, "width": 512, "height": 512}
STATES = {"QUEUED", "PROCESSING", "COMPLETED", "FAILED"}


def is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


@pytest.fixture
def client(server: LiveServer) -> Iterator[Client]:
    with Client(api_key=server.key, base_url=server.url, timeout=120) as c:
        yield c


# -- run, run_sync, submit_async


def test_run_returns_completed_result_with_webp_output_urls(client: Client) -> None:
    result = client.run("kolors", prompt="a red fox in the snow", seed=11, **SMALL)

    assert result["status"] == "COMPLETED"
    assert result["seeds"] == [11]
    assert len(result["output"]) == 1
    assert result["output"][0].startswith(client.base_url + "/v2/requests/")
    assert set(result["metrics"]) >= {"inference_time", "queue_time", "total_time"}
    assert result["input"]["steps"] == 2
    [image] = client.images(result)
    assert is_webp(image)


def test_output_url_opens_without_a_key(client: Client) -> None:
    result = client.run("kolors", prompt="a lantern", seed=3, **SMALL)

    response = httpx.get(result["output"][0], timeout=30)

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert response.content == client.download(result["output"][0])


def test_run_sync_bytes_equal_the_bytes_behind_run_output(client: Client) -> None:
    params = {"prompt": "a lighthouse at dusk", "seed": 1234, **SMALL}
    async_bytes = client.images(client.run("kolors", **params))[0]

    response = client.run_sync("kolors", **params)

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["x-seed"] == "1234"
    assert response.content == async_bytes


def test_run_sync_with_several_images_answers_json(client: Client) -> None:
    response = client.run_sync("kolors", prompt="two koi", seed=7, number_of_images=2, **SMALL)

    body = response.json()
    assert body["seeds"] == [7, 8]
    assert len(body["images"]) == 2


def test_submit_async_then_wait_returns_the_result(client: Client) -> None:
    seen: list[dict[str, Any]] = []

    job = client.submit_async("kolors", prompt="a paper boat", seed=5, steps=4, width=512, height=512)
    result = job.wait(timeout=120, interval=0.05, on_status=seen.append)

    assert job.submit_response["status"] == "QUEUED"
    assert job.status_url == f"{client.base_url}/v2/requests/{job.request_id}/status"
    assert job.response_url == f"{client.base_url}/v2/requests/{job.request_id}"
    assert result["request_id"] == job.request_id
    assert result["status"] == "COMPLETED"
    assert result["seeds"] == [5]
    assert seen and seen[-1]["status"] == "COMPLETED"
    for body in seen:
        assert body["request_id"] == job.request_id
        assert body["status"] in STATES
        if body["status"] == "PROCESSING":
            assert 0 <= body["progress"]["step"] <= body["progress"]["total_steps"] == 4
        if body["status"] == "QUEUED" and "queue_position" in body:
            assert isinstance(body["queue_position"], int)


def test_status_and_result_of_a_finished_job(client: Client) -> None:
    job = client.submit_async("kolors", prompt="a teapot", **SMALL)
    job.wait(timeout=120, interval=0.05)

    status = job.status()
    again = client.job(job.request_id).result()

    assert status == {"request_id": job.request_id, "status": "COMPLETED"}
    assert again["status"] == "COMPLETED"
    assert again["request_id"] == job.request_id


def test_wait_past_its_timeout_raises_inference_timeout_and_the_job_goes_on(client: Client,
                                                                         server: LiveServer) -> None:
    # The job waits at the engine's gate after its first step until the test opens it.
    job = client.submit_async("kolors", prompt="a slow cathedral hold:timeout", steps=8, width=512, height=512)

    with pytest.raises(InferenceTimeout) as info:
        job.wait(timeout=0.05, interval=0.01)
    pending = job.result()  # 202 with the status body while it runs: a payload, not an error
    server_gate(server).open("timeout")

    assert info.value.request_id == job.request_id
    assert info.value.elapsed_s >= 0.05
    assert job.request_id in str(info.value)
    assert pending["request_id"] == job.request_id
    assert pending["status"] in {"QUEUED", "PROCESSING", "COMPLETED"}
    assert job.wait(timeout=120, interval=0.1)["status"] == "COMPLETED"


# -- errors


def test_bad_parameter_is_api_error_400_with_the_server_message(client: Client) -> None:
    with pytest.raises(APIError) as info:
        client.run("kolors", prompt="x", steps=0)

    assert info.value.status == 400
    assert info.value.detail == "steps: must be between 1 and 50, got 0"
    assert info.value.body == {"error": "steps: must be between 1 and 50, got 0"}


def test_run_sync_bad_size_is_api_error_400_naming_the_nearest_sizes(client: Client) -> None:
    with pytest.raises(APIError) as info:
        client.run_sync("kolors", prompt="x", width=515)

    assert info.value.status == 400
    assert info.value.detail == "width: must be a multiple of 8, got 515 (nearest valid: 512 or 520)"


def test_unknown_field_is_api_error_400(client: Client) -> None:
    with pytest.raises(APIError) as info:
        client.submit_async("kolors", prompt="x", guidance=3)

    assert (info.value.status, info.value.detail) == (400, "guidance: unknown field")


def test_bad_key_is_api_error_401(server: LiveServer) -> None:
    with Client(api_key="kol_not_a_key", base_url=server.url) as bad, pytest.raises(APIError) as info:
        bad.run("kolors", prompt="x", **SMALL)

    assert info.value.status == 401
    assert info.value.detail == "invalid API key"


def test_missing_key_is_api_error_401(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOLORS_API_KEY", raising=False)
    with Client(base_url=server.url) as anonymous, pytest.raises(APIError) as info:
        anonymous.run_sync("kolors", prompt="x", **SMALL)

    assert info.value.status == 401
    assert "missing API key" in str(info.value.detail)


def test_unknown_model_is_api_error_404(client: Client) -> None:
    with pytest.raises(APIError) as info:
        client.run("no-such-model", prompt="x")

    assert info.value.status == 404
    assert info.value.detail == "unknown model: no-such-model"


def test_unknown_request_is_api_error_404(client: Client) -> None:
    with pytest.raises(APIError) as info:
        client.job("0" * 32).wait(timeout=5)

    assert info.value.status == 404


def test_errors_share_one_tree_under_the_segmind_names() -> None:
    assert SegmindError is KolorsAPIError
    assert kc.SegmindClient is Client
    for cls in (APIError, InferenceFailed, InferenceTimeout):
        assert issubclass(cls, SegmindError)
    failed = InferenceFailed("boom", {"status": "FAILED", "error": "boom"})
    assert (failed.status, failed.detail, failed.status_body["error"]) == (None, "boom", "boom")
    assert APIError(400, "bad").to_dict() == {"status": 400, "detail": "bad"}


def test_cancelled_job_raises_inference_failed(client: Client, server: LiveServer) -> None:
    # held at the engine's gate: the worker is busy until the test opens it
    busy = client.submit_async("kolors", prompt="keeps the worker busy hold:busy", steps=8, width=512, height=512)
    job = client.submit_async("kolors", prompt="never drawn", **SMALL)

    cancelled = job.cancel()
    with pytest.raises(InferenceFailed) as info:
        job.wait(timeout=60, interval=0.05)
    failed = job.result()  # the FAILED body comes with 422: returned, not raised
    server_gate(server).open("busy")

    assert cancelled["request_id"] == job.request_id
    assert cancelled["cancel_requested"] is True
    assert info.value.detail == "cancelled"
    assert info.value.status_body == {"request_id": job.request_id, "status": "FAILED", "error": "cancelled"}
    assert failed["status"] == "FAILED"
    assert failed["error"] == "cancelled"
    assert busy.wait(timeout=120, interval=0.1)["status"] == "COMPLETED"


# -- configuration and conveniences


def test_base_url_may_end_in_v1(server: LiveServer) -> None:
    with Client(api_key=server.key, base_url=server.v1 + "/") as c:
        assert c.base_url == server.url
        assert [m["id"] for m in c.models()] == ["kolors", "kolors-img2img"]


def test_module_level_run_uses_the_environment(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOLORS_API_BASE_URL", server.v1)
    monkeypatch.setenv("KOLORS_API_KEY", server.key)
    monkeypatch.setattr(client_module, "_default_client", None)

    result = kc.run("kolors", prompt="a compass", seed=9, **SMALL)
    response = kc.run_sync("kolors", prompt="a compass", seed=9, **SMALL)
    job = kc.submit_async("kolors", prompt="a compass", seed=9, **SMALL)

    assert result["status"] == "COMPLETED"
    assert is_webp(response.content)
    assert job.wait(timeout=120, interval=0.05)["seeds"] == [9]
    assert client_module._default_client is not None
    client_module._default_client.close()


def test_account_reports_credits_and_usage(client: Client) -> None:
    before = client.account()
    client.run_sync("kolors", prompt="usage", steps=2, width=512, height=512)
    account = client.account()

    assert account["admin"] is True and account["credits"] is None  # the bootstrap key is unlimited
    # unlimited keys are metered too: one more request, 0.02 more credits spent
    assert account["usage"]["requests"] == before["usage"]["requests"] + 1
    assert account["usage"]["credits_spent"] == pytest.approx(before["usage"]["credits_spent"] + 0.02)


def test_context_manager_closes_the_connection(server: LiveServer) -> None:
    with Client(api_key=server.key, base_url=server.url) as c:
        c.models()
    assert c._http.is_closed


# -- FAILED jobs: the built-in content screen fails a blocked prompt, refunded, served as 422

BLOCKED_PROMPT = "csam on a beach"
BLOCKED_ERROR = 'content blocked: prompt contains a blocked term: "csam"'


def assert_blocked(failed: InferenceFailed) -> None:
    assert failed.detail == BLOCKED_ERROR
    assert failed.status is None
    assert failed.status_body["status"] == "FAILED"
    assert failed.status_body["error"] == BLOCKED_ERROR
    assert isinstance(failed.request_id, str) and len(failed.request_id) == 32


def test_run_of_a_blocked_prompt_raises_inference_failed_with_the_server_reason(client: Client) -> None:
    with pytest.raises(InferenceFailed) as info:
        client.run("kolors", prompt=BLOCKED_PROMPT, **SMALL)

    assert_blocked(info.value)
    assert client.job(info.value.request_id or "").status()["status"] == "FAILED"


def test_run_sync_of_a_blocked_prompt_raises_inference_failed(client: Client) -> None:
    with pytest.raises(InferenceFailed) as info:
        client.run_sync("kolors", prompt=BLOCKED_PROMPT, **SMALL)

    assert_blocked(info.value)


def test_wait_on_a_blocked_job_raises_inference_failed_and_result_returns_the_body(client: Client) -> None:
    job = client.submit_async("kolors", prompt=BLOCKED_PROMPT, **SMALL)

    with pytest.raises(InferenceFailed) as info:
        job.wait(timeout=120, interval=0.05)
    status = job.status()  # a terminal body is a payload, even under 422
    result = job.result()

    assert_blocked(info.value)
    assert info.value.request_id == job.request_id
    assert status == {"request_id": job.request_id, "status": "FAILED", "error": BLOCKED_ERROR}
    assert result["status"] == "FAILED" and result["error"] == BLOCKED_ERROR


async def test_async_client_raises_inference_failed_on_a_blocked_prompt(server: LiveServer) -> None:
    async with AsyncClient(api_key=server.key, base_url=server.url, timeout=120) as c:
        with pytest.raises(InferenceFailed) as ran:
            await c.run("kolors", prompt=BLOCKED_PROMPT, **SMALL)
        with pytest.raises(InferenceFailed) as ran_sync:
            await c.run_sync("kolors", prompt=BLOCKED_PROMPT, **SMALL)
        job = await c.submit_async("kolors", prompt=BLOCKED_PROMPT, **SMALL)
        with pytest.raises(InferenceFailed) as waited:
            await job.wait(timeout=120, interval=0.05)
        result = await job.result()

    for info in (ran, ran_sync, waited):
        assert_blocked(info.value)
    assert waited.value.request_id == job.request_id
    assert result["status"] == "FAILED" and result["error"] == BLOCKED_ERROR


# -- what a live server on loopback cannot stand in for: a second host (MockTransport)


def fake_server(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"img")

    return httpx.MockTransport(handle)


def test_key_is_not_sent_to_another_host() -> None:
    seen: list[httpx.Request] = []
    with Client(api_key="secret", base_url="http://kolors.test", transport=fake_server(seen)) as c:
        c.download("http://kolors.test/v2/requests/r1/outputs/0.webp")
        c.download("https://cdn.example.com/r1/0.webp")

    assert seen[0].headers.get("x-api-key") == "secret"
    assert "x-api-key" not in seen[1].headers


# -- AsyncClient


async def test_async_client_run_returns_webp_output(server: LiveServer) -> None:
    statuses: list[str] = []

    async def on_status(body: dict[str, Any]) -> None:
        statuses.append(body["status"])

    async with AsyncClient(api_key=server.key, base_url=server.url, timeout=120) as c:
        result = await c.run("kolors", prompt="a glass city", seed=21, **SMALL)
        job = await c.submit_async("kolors", prompt="a glass city", seed=21, **SMALL)
        again = await job.wait(timeout=120, interval=0.05, on_status=on_status)
        images = await c.images(result)
        sync_bytes = (await c.run_sync("kolors", prompt="a glass city", seed=21, **SMALL)).content

    assert result["status"] == again["status"] == "COMPLETED"
    assert statuses[-1] == "COMPLETED"
    assert is_webp(images[0])
    assert images[0] == sync_bytes


async def test_async_client_bad_parameter_is_api_error_400(server: LiveServer) -> None:
    async with AsyncClient(api_key=server.key, base_url=server.url) as c:
        with pytest.raises(APIError) as info:
            await c.run("kolors", prompt="x", cfg=99)

    assert info.value.status == 400
    assert info.value.detail == "cfg: must be between 0 and 20, got 99"


async def test_async_wait_past_its_timeout_raises_inference_timeout(server: LiveServer) -> None:
    async with AsyncClient(api_key=server.key, base_url=server.url) as c:
        # held at the engine's gate, so that it cannot be done before the wait gives up
        job = await c.submit_async("kolors", prompt="x hold:async-timeout", steps=8, width=512, height=512)
        with pytest.raises(InferenceTimeout) as info:
            await job.wait(timeout=0.0, interval=0.01)
        server_gate(server).open("async-timeout")
        await job.wait(timeout=120, interval=0.05)

    assert info.value.request_id == job.request_id
