"""The real `segmind` SDK 1.3.0, unmodified, pointed at a live server on loopback."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image
from segmind import SegmindClient
from segmind.exceptions import SegmindError
from segmind.v2 import InferenceFailed, InferenceTimeout

from tests.conftest import LiveServer

SEED_PROMPT = (
    "In this lively 2D illustration, three animated boys are seen joyfully playing on a sandy beach, "
    "their laughter echoing against the backdrop of rolling waves and a clear blue sky."
)
SEED_REQUEST = dict(cfg=6, seed=441234134, steps=25, width=1024, height=1024, prompt=SEED_PROMPT,
                    scheduler="EulerDiscreteScheduler", output_format="webp", output_quality=80,
                    number_of_images=1)
SMALL = dict(steps=2, width=512, height=512)


@pytest.fixture
def sdk(server: LiveServer) -> SegmindClient:
    return SegmindClient(api_key=server.key, base_url=server.v1, timeout=120)


def webp_size(data: bytes) -> tuple[int, int]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def test_the_seed_request_returns_a_1024_webp_and_async_gives_the_same_bytes(sdk: SegmindClient,
                                                                            server: LiveServer) -> None:
    sync = sdk.run_sync("kolors", **SEED_REQUEST)
    assert sync.headers["content-type"] == "image/webp"
    assert sync.headers["x-seed"] == "441234134" and sync.headers["x-request-id"]
    assert float(sync.headers["x-inference-time"]) > 0
    assert webp_size(sync.content) == (1024, 1024)

    result = sdk.run("kolors", **SEED_REQUEST)  # v2 submit + wait, the SDK's default path
    assert result["status"] == "COMPLETED" and result["seeds"] == [441234134]
    assert set(result["metrics"]) == {"inference_time", "queue_time", "batch_wait", "call_time", "finish_time",
                                      "total_time"}
    assert result["input"]["prompt"] == SEED_PROMPT
    (url,) = result["output"]
    image = httpx.get(url)  # signed: no key needed, as in an <img> tag
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
    assert image.content == sync.content

    job = sdk.submit_async("kolors", **SEED_REQUEST)
    assert job.status()["status"] in ("QUEUED", "PROCESSING", "COMPLETED")
    waited = job.wait(timeout=120, interval=0.2)
    assert httpx.get(waited["output"][0]).content == sync.content


def test_three_pngs_are_three_distinct_images_with_consecutive_seeds(sdk: SegmindClient) -> None:
    result = sdk.run("kolors", prompt="three cats", seed=7, number_of_images=3, output_format="png", **SMALL)
    assert result["seeds"] == [7, 8, 9]
    images = [httpx.get(url).content for url in result["output"]]
    assert all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert len(set(images)) == 3
    many = sdk.run_sync("kolors", prompt="three cats", seed=7, number_of_images=3, output_format="png", **SMALL)
    body = many.json()
    assert many.headers["content-type"] == "application/json" and body["seeds"] == [7, 8, 9]
    import base64

    assert [base64.b64decode(b) for b in body["images"]] == images


def test_same_seed_same_bytes_and_different_seed_different_bytes(sdk: SegmindClient) -> None:
    a = sdk.run_sync("kolors", prompt="a fox", seed=1, **SMALL).content
    b = sdk.run_sync("kolors", prompt="a fox", seed=1, **SMALL).content
    c = sdk.run_sync("kolors", prompt="a fox", seed=2, **SMALL).content
    assert a == b and a != c


def test_inference_timeout_carries_the_request_id(sdk: SegmindClient) -> None:
    # 50 steps (about a second on the tiny model): never done within the 50 ms the SDK waits
    job = sdk.submit_async("kolors", prompt="slow", steps=50, width=512, height=512)
    with pytest.raises(InferenceTimeout) as err:
        job.wait(timeout=0.05, interval=0.01)
    assert err.value.request_id == job.request_id
    done = job.wait(timeout=240, interval=0.5)  # it went on and completes
    assert done["status"] == "COMPLETED"


def test_a_failed_job_raises_inference_failed(sdk: SegmindClient, server: LiveServer) -> None:
    busy = sdk.submit_async("kolors", prompt="keeps the worker busy", steps=50, width=512, height=512)
    job = sdk.submit_async("kolors", prompt="boom", **SMALL)
    r = httpx.post(f"{server.url}/v2/requests/{job.request_id}/cancel", headers=server.headers())
    assert r.status_code == 200 and r.json()["status"] == "FAILED"
    with pytest.raises(InferenceFailed) as err:
        job.wait(timeout=60, interval=0.1)
    assert err.value.detail == "cancelled" and err.value.status_body["status"] == "FAILED"
    assert busy.wait(timeout=120, interval=0.2)["status"] == "COMPLETED"


@pytest.mark.parametrize(("kwargs", "status", "words"), [
    ({"prompt": "x", "steps": 99}, 400, "steps: must be between 1 and 50"),
    ({"prompt": ""}, 400, "prompt: must not be empty"),
    ({"prompt": "x", "colour": "red"}, 400, "colour: unknown field"),
])
def test_bad_input_is_a_segmind_error_with_status(sdk: SegmindClient, kwargs: dict[str, object], status: int,
                                                  words: str) -> None:
    for call in (sdk.run_sync, sdk.submit_async):
        with pytest.raises(SegmindError) as err:
            call("kolors", **kwargs)
        assert err.value.status == status and words in (err.value.detail or "")


def test_bad_key_is_401_and_unknown_model_is_404(server: LiveServer, sdk: SegmindClient) -> None:
    bad = SegmindClient(api_key="kol_not_a_key", base_url=server.v1)
    with pytest.raises(SegmindError) as err:
        bad.run_sync("kolors", prompt="x")
    assert err.value.status == 401
    with pytest.raises(SegmindError) as err:
        sdk.run_sync("sdxl", prompt="x")
    assert err.value.status == 404 and err.value.detail == "unknown model: sdxl"
