"""The IP-Adapter on the wire: a live server started with `--ip-adapter tiny` (tiny image encoder and
IP-Adapter-Plus weights, built by `kolors-api tiny-model`, loaded through diffusers' `load_ip_adapter`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, start_server
from tests.pictures import b64, picture

REF = picture(120, 90, seed=7)
BODY = {"prompt": "a fox", "seed": 8, "steps": 2, "width": 512, "height": 512, "output_format": "png"}


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    assert (tiny_model / "ip_adapter" / "ip_adapter_plus_general.safetensors").is_file()  # from `tiny-model`
    srv = start_server(tiny_model, tmp_path_factory.mktemp("ip"), env={"KOLORS_API_SYNC_TIMEOUT_SECONDS": "120"},
                       extra=["--ip-adapter", "tiny"])
    yield srv
    srv.stop()


def post(server: LiveServer, model: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.v1}/{model}", json=body, headers=server.headers(), timeout=120)


def test_scale_zero_gives_the_plain_bytes_and_a_reference_steers(server: LiveServer) -> None:
    plain = post(server, "kolors", BODY)
    zero = post(server, "kolors", {**BODY, "ip_adapter_image": b64(REF), "ip_adapter_scale": 0})
    steered = post(server, "kolors", {**BODY, "ip_adapter_image": b64(REF)})
    assert plain.status_code == zero.status_code == steered.status_code == 200, steered.text
    assert zero.content == plain.content
    assert steered.content != plain.content


def test_img2img_takes_a_reference_too(server: LiveServer) -> None:
    body = {**BODY, "image": b64(picture(96, 80)), "strength": 0.5}
    plain = post(server, "kolors-img2img", body)
    steered = post(server, "kolors-img2img", {**body, "ip_adapter_image": b64(REF), "ip_adapter_scale": 0.8})
    assert plain.status_code == steered.status_code == 200, steered.text
    assert steered.content != plain.content


def test_models_say_the_reference_is_taken(server: LiveServer) -> None:
    data = httpx.get(f"{server.v1}/models", headers=server.headers()).json()["data"]
    assert all(m["images"]["ip_adapter_image"] for m in data)
    assert all("ip_adapter_scale" in m["parameters"]["properties"] for m in data)


def test_scale_out_of_range_is_a_400(server: LiveServer) -> None:
    r = post(server, "kolors", {**BODY, "ip_adapter_image": b64(REF), "ip_adapter_scale": 1.5})
    assert r.status_code == 400 and r.json()["error"].startswith("ip_adapter_scale: must be between 0 and 1")
