"""`kolors-img2img` on the wire: a live embedded server (tiny model), pictures in as base64, data URI
and URL (a real picture server on loopback), stored with the job, never in records or answers."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import LiveServer, start_server, wait_for_status
from tests.pictures import PictureServer, Route, b64, bomb_png, picture

PNG = picture(96, 80)
SHA = hashlib.sha256(PNG).hexdigest()
FAST = {"steps": 2, "strength": 0.5, "width": 512, "height": 512, "output_format": "png"}


@pytest.fixture(scope="module")
def pictures() -> Iterator[PictureServer]:
    srv = PictureServer(routes={"/a.png": Route(200, PNG, {"content-type": "image/png"}),
                                "/to-private": Route(302, b"", {"location": "http://10.0.0.5/x.png"})})
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(tiny_model, tmp_path_factory.mktemp("img2img"),
                       env={"KOLORS_API_SYNC_TIMEOUT_SECONDS": "120", "KOLORS_API_FETCH_ALLOW_HOSTS": "127.0.0.1"})
    yield srv
    srv.stop()


def post(server: LiveServer, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers(), timeout=120, **kw)


def test_sync_img2img_returns_the_requested_size_and_same_seed_same_bytes(server: LiveServer) -> None:
    body = {"prompt": "a fox", "image": b64(PNG), "seed": 3, **FAST}
    a, b = post(server, "/v1/kolors-img2img", body), post(server, "/v1/kolors-img2img", body)
    assert a.status_code == 200, a.text
    assert a.headers["content-type"] == "image/png" and a.headers["x-seed"] == "3"
    assert Image.open(io.BytesIO(a.content)).size == (512, 512)
    assert a.content == b.content


def test_a_url_and_a_data_uri_are_the_same_input(server: LiveServer, pictures: PictureServer) -> None:
    body = {"prompt": "a fox", "seed": 4, **FAST}
    by_url = post(server, "/v1/kolors-img2img", {**body, "image": f"{pictures.url}/a.png"})
    by_uri = post(server, "/v1/kolors-img2img", {**body, "image": f"data:image/png;base64,{b64(PNG)}"})
    assert by_url.status_code == 200, by_url.text
    assert by_url.content == by_uri.content
    assert "/a.png" in pictures.hits


def test_async_result_carries_the_sha256_not_the_bytes_and_the_input_is_stored_once(server: LiveServer) -> None:
    r = post(server, "/v2/kolors-img2img", {"prompt": "a fox", "image": b64(PNG), **FAST})
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    wait_for_status(server, server.key, rid, lambda s: s["status"] == "COMPLETED")
    result = httpx.get(f"{server.url}/v2/requests/{rid}", headers=server.headers()).json()
    assert result["input"]["image"] == SHA and result["input"]["strength"] == 0.5
    assert b64(PNG)[:40] not in r.text + str(result)
    stored = server.data_dir / "outputs" / rid / "inputs"
    assert [p.name for p in stored.iterdir()] == [SHA] and (stored / SHA).read_bytes() == PNG


def test_without_width_and_height_the_output_keeps_the_inputs_aspect(server: LiveServer) -> None:
    r = post(server, "/v1/kolors-img2img", {"prompt": "a fox", "image": b64(picture(160, 120)), "steps": 2,
                                           "strength": 0.5, "output_format": "png"})
    assert r.status_code == 200, r.text
    # 160x120 scaled to 512 high: 682.7 wide, to a multiple of 8
    assert Image.open(io.BytesIO(r.content)).size == (680, 512)


def test_the_price_is_by_the_steps_run(server: LiveServer) -> None:
    user = server.create_key(credits=10)
    headers = {"x-api-key": user["key"]}
    r = httpx.post(f"{server.url}/v1/kolors-img2img", headers=headers, timeout=120,
                   json={"prompt": "a fox", "image": b64(PNG), "steps": 20, "strength": 0.5, "width": 1024,
                         "height": 1024})
    assert r.status_code == 200, r.text
    account = httpx.get(f"{server.url}/v1/account", headers=headers).json()
    assert account["credits"] == pytest.approx(10 - 10 / 25)  # int(20 × 0.5) = 10 steps run


@pytest.mark.parametrize(("change", "error"), [
    ({"strength": 0}, "strength: must be more than 0 and at most 1, got 0"),
    ({"strength": 0.1, "steps": 5}, "strength: steps × strength must be at least 1"),
    ({"image": b64(b"not a picture at all")}, "image: not a PNG, JPEG or WebP image"),
    ({"image": b64(bomb_png())}, "image: 10000x10000 is more than 4096x4096 pixels"),
    ({"image": "http://10.0.0.5/x.png"}, "image: host 10.0.0.5 is not allowed"),
    ({"ip_adapter_image": b64(PNG)}, "ip_adapter_image: this server has no IP-Adapter (start it with --ip-adapter)"),
    ({"image": None}, "image: is required"),
])
def test_refusals_are_400s_naming_the_field(server: LiveServer, change: dict[str, Any], error: str) -> None:
    body = {"prompt": "a fox", "image": b64(PNG), **FAST, **change}
    r = post(server, "/v1/kolors-img2img", {k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(error)


def test_a_redirect_to_a_private_address_is_refused(server: LiveServer, pictures: PictureServer) -> None:
    r = post(server, "/v2/kolors-img2img", {"prompt": "a fox", "image": f"{pictures.url}/to-private", **FAST})
    assert r.status_code == 400 and r.json()["error"].startswith("image: host 10.0.0.5 is not allowed")
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_models_lists_img2img_with_its_schema(server: LiveServer) -> None:
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", headers=server.headers()).json()["data"]}
    img2img = models["kolors-img2img"]
    assert img2img["parameters"]["required"] == ["prompt", "image"]
    assert img2img["parameters"]["properties"]["strength"]["default"] == 0.75
    assert img2img["parameters"]["properties"]["strength"]["exclusiveMinimum"] == 0
    assert img2img["images"] == {"image": True, "ip_adapter_image": False}
    assert models["kolors"]["images"] == {"image": False, "ip_adapter_image": False}
    assert "ip_adapter_image" not in models["kolors"]["parameters"]["properties"]
    assert "int(steps*strength)" in img2img["pricing"]["formula"]
