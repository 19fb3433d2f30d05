"""The real `openai` SDK against the live server's `POST /v1/images/generations`."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import LiveServer


@pytest.fixture
def oai(server: LiveServer) -> OpenAI:
    return OpenAI(api_key=server.key, base_url=server.v1, max_retries=0, timeout=120)


def test_b64_images_with_size_and_n(oai: OpenAI) -> None:
    res = oai.images.generate(model="kolors", prompt="a lighthouse", n=2, size="512x512",
                              response_format="b64_json", extra_body={"steps": 2, "seed": 3})
    assert res.data is not None and len(res.data) == 2
    images = [base64.b64decode(d.b64_json or "") for d in res.data]
    assert all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in images) and images[0] != images[1]
    assert res.created > 0


def test_url_response_format_gives_signed_urls(oai: OpenAI) -> None:
    res = oai.images.generate(prompt="a lighthouse", size="512x512", response_format="url",
                              extra_body={"steps": 2, "seed": 3})
    assert res.data is not None
    (item,) = res.data
    assert item.url and httpx.get(item.url).status_code == 200


def test_same_seed_through_openai_and_segmind_routes_gives_the_same_png(oai: OpenAI, server: LiveServer) -> None:
    res = oai.images.generate(prompt="same", size="512x512", extra_body={"steps": 2, "seed": 11})
    assert res.data is not None
    segmind = httpx.post(server.v1 + "/kolors", headers=server.headers(), timeout=120,
                         json={"prompt": "same", "width": 512, "height": 512, "steps": 2, "seed": 11,
                               "output_format": "png"})
    assert base64.b64decode(res.data[0].b64_json or "") == segmind.content


def test_errors_surface_as_openai_exceptions_with_their_message(oai: OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(prompt="x", size="100x100")
    # OpenAI's error shape: the SDK shows the message, and its fields come through.
    assert err.value.status_code == 400 and "width: must be between 512 and 2048" in str(err.value)
    assert err.value.body == {"message": err.value.body["message"], "type": "invalid_request_error",  # type: ignore
                              "param": "size", "code": None}
    assert err.value.type == "invalid_request_error" and err.value.param == "size"
    bad = OpenAI(api_key="kol_wrong", base_url=server.v1, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.images.generate(prompt="x")
    assert "invalid API key" in str(auth.value) and auth.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as unknown:
        oai.images.generate(prompt="x", extra_body={"colour": "red"})
    assert "colour" in str(unknown.value)


def test_the_segmind_routes_keep_their_flat_error_shape(server: LiveServer) -> None:
    r = httpx.post(server.v1 + "/kolors", headers=server.headers(), json={"prompt": "x", "width": 100})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(server.v1 + "/kolors", json={"prompt": "x"})
    assert r.status_code == 401 and r.json() == {"error": "missing API key: send x-api-key or Authorization: Bearer"}
