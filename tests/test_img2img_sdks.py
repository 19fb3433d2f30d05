"""Images in through the real SDKs: openai's `images.edit` (multipart) and segmind's `run("kolors-img2img")`,
against a live embedded server (tiny model)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image
from segmind import SegmindClient

from tests.conftest import LiveServer
from tests.pictures import b64, picture

PNG = picture(160, 120)
SMALL = {"steps": 2, "strength": 0.5, "seed": 5}


@pytest.fixture
def oai(server: LiveServer) -> OpenAI:
    return OpenAI(api_key=server.key, base_url=server.v1, max_retries=0, timeout=120)


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def test_openai_images_edit_runs_img2img(oai: OpenAI, server: LiveServer) -> None:
    res = oai.images.edit(image=("in.png", PNG, "image/png"), prompt="a watercolour", n=2, size="512x512",
                          response_format="b64_json", extra_body=SMALL)
    assert res.data is not None and len(res.data) == 2
    images = [base64.b64decode(d.b64_json or "") for d in res.data]
    assert all(img[:8] == b"\x89PNG\r\n\x1a\n" and size_of(img) == (512, 512) for img in images)
    # the same request on the Segmind route gives the same bytes
    segmind = httpx.post(server.v1 + "/kolors-img2img", headers={**server.headers(), "accept": "application/json"},
                         timeout=120, json={"prompt": "a watercolour", "image": b64(PNG), "width": 512, "height": 512,
                                            "number_of_images": 2, "output_format": "png", **SMALL})
    assert [base64.b64decode(img) for img in segmind.json()["images"]] == images


def test_openai_edit_with_auto_size_keeps_the_aspect_and_url_format(oai: OpenAI) -> None:
    res = oai.images.edit(image=("in.png", PNG, "image/png"), prompt="a watercolour", response_format="url",
                          extra_body=SMALL)
    assert res.data is not None
    (item,) = res.data
    assert item.url and size_of(httpx.get(item.url).content) == (680, 512)


def test_openai_edit_refusals_are_in_openais_shape(oai: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as mask:
        oai.images.edit(image=("in.png", PNG, "image/png"), mask=("m.png", PNG, "image/png"), prompt="x")
    assert mask.value.status_code == 400 and mask.value.param == "mask"
    assert "mask: not supported yet" in str(mask.value) and mask.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.images.edit(image=("in.png", b"GIF89a not really", "image/gif"), prompt="x")
    assert bad.value.param == "image" and "image: not a PNG, JPEG or WebP image" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as size:
        oai.images.edit(image=("in.png", PNG, "image/png"), prompt="x", size="100x100")  # type: ignore[arg-type]
    assert size.value.param == "size"


def test_segmind_sdk_runs_kolors_img2img(server: LiveServer) -> None:
    sdk = SegmindClient(api_key=server.key, base_url=server.v1, timeout=120)
    body = {"prompt": "a watercolour", "image": b64(PNG), "width": 512, "height": 512, "output_format": "png",
            **SMALL}
    result = sdk.run("kolors-img2img", **body)  # v2 submit and wait, the SDK's default path
    assert result["status"] == "COMPLETED" and result["seeds"] == [5]
    assert result["input"]["image"] == hashlib.sha256(PNG).hexdigest()
    (url,) = result["output"]
    image = httpx.get(url).content
    assert size_of(image) == (512, 512)
    sync = sdk.run_sync("kolors-img2img", **body)
    assert sync.content == image


# -- the Python client and the CLI take a path, bytes, a PIL image or a URL for picture fields
def test_client_takes_a_path_bytes_a_pil_image_or_base64(server: LiveServer, tmp_path: Path) -> None:
    from kolors_api.client import Client

    path = tmp_path / "in.png"
    path.write_bytes(PNG)
    body = {"prompt": "a watercolour", "width": 512, "height": 512, "output_format": "png", **SMALL}
    with Client(api_key=server.key, base_url=server.url, timeout=120) as client:
        answers = [client.run_sync("kolors-img2img", image=value, **body).content
                   for value in (str(path), path, PNG, Image.open(io.BytesIO(PNG)), b64(PNG))]
    assert all(a == answers[0] for a in answers) and size_of(answers[0]) == (512, 512)


async def test_async_client_takes_a_picture(server: LiveServer) -> None:
    from kolors_api.client import AsyncClient

    async with AsyncClient(api_key=server.key, base_url=server.url, timeout=120) as client:
        result = await client.run("kolors-img2img", prompt="a watercolour", image=PNG, width=512, height=512, **SMALL)
    assert result["status"] == "COMPLETED" and result["input"]["image"] == hashlib.sha256(PNG).hexdigest()


def test_urls_and_data_uris_go_as_they_are() -> None:
    from kolors_api.client._images import image_value

    for value in ("https://example.com/a.png", "HTTP://example.com/a.png", "data:image/png;base64,AAAA"):
        assert image_value(value) == value


def test_cli_generate_with_image_and_strength(server: LiveServer, tmp_path: Path) -> None:
    picture_path = tmp_path / "in.png"
    picture_path.write_bytes(PNG)
    out = tmp_path / "out.png"
    env = {**os.environ, "KOLORS_API_BASE_URL": server.url, "KOLORS_API_KEY": server.key}
    done = subprocess.run([sys.executable, "-m", "kolors_api.cli", "generate", "a watercolour", "--image",
                           str(picture_path), "--strength", "0.5", "--steps", "2", "--seed", "5", "--width", "512",
                           "--height", "512", "-o", str(out), "--no-progress"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and size_of(out.read_bytes()) == (512, 512)
    refused = subprocess.run([sys.executable, "-m", "kolors_api.cli", "generate", "x", "--image", str(picture_path),
                              "--strength", "0", "--no-progress", "-o", str(tmp_path / "no.png")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "strength: must be more than 0" in refused.stderr
