"""The playground's picture picker (kolors-img2img's `image`), in real headless Chromium against a live
server: a file chosen shows its preview and runs image to image; a URL of the server's own shows its
preview and the server fetches it at submit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, start_server
from tests.pictures import picture
from tests.test_playground import WATCH_CSP, Page, browser  # noqa: F401 - the browser fixture

SMALL = {"width": "512", "height": "512", "steps": "2"}


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(tiny_model, tmp_path_factory.mktemp("pgimg"),
                       env={"KOLORS_API_SYNC_TIMEOUT_SECONDS": "120", "KOLORS_API_FETCH_ALLOW_HOSTS": "127.0.0.1"})
    yield srv
    srv.stop()


@pytest.fixture
def tab(browser: Any, server: LiveServer, tmp_path: Path) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(WATCH_CSP)
    page = Page(context.new_page(), server, tmp_path)
    yield page
    assert page.csp_violations() == []
    assert not [m for m in page.console if m.startswith("pageerror")], page.console
    context.close()


def test_a_chosen_file_is_previewed_and_runs_img2img(tab: Page, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(picture(160, 120))
    tab.open(key=tab.server.key)
    tab.page.select_option("#model", "kolors-img2img")
    tab.page.wait_for_selector("#f-image-file")
    assert tab.page.input_value("#f-strength") == "0.75"  # the schema's default
    tab.page.set_input_files("#f-image-file", str(source))
    tab.page.wait_for_function("() => document.querySelector('#f-image-preview').naturalWidth === 160")
    assert tab.page.get_attribute("#f-image-preview", "src").startswith("data:image/png;base64,")
    tab.fill(prompt="a watercolour", seed="3", strength="0.5", **SMALL)
    tab.page.click("#generate")
    tab.page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    tab.page.wait_for_function("() => document.querySelector('#images img').naturalWidth === 512")
    tab.shot("img2img")


def test_without_a_picture_the_form_says_so(tab: Page) -> None:
    tab.open(key=tab.server.key)
    tab.page.select_option("#model", "kolors-img2img")
    tab.fill(prompt="a watercolour", **SMALL)
    tab.page.click("#generate")
    tab.page.wait_for_function("() => document.querySelector('#err-image').textContent !== ''")
    assert tab.page.inner_text("#err-image").startswith("image: ")


def test_a_url_of_the_server_is_previewed_and_fetched(tab: Page, server: LiveServer) -> None:
    made = httpx.post(f"{server.url}/v2/kolors", headers=server.headers(), timeout=60,
                      json={"prompt": "a fox", "steps": 2, "width": 512, "height": 512, "output_format": "png"})
    rid = made.json()["request_id"]
    result: dict[str, Any] = {}
    for _ in range(600):
        result = httpx.get(f"{server.url}/v2/requests/{rid}", headers=server.headers()).json()
        if result.get("status") == "COMPLETED":
            break
        tab.page.wait_for_timeout(100)
    url = result["output"][0]
    tab.open(key=tab.server.key)
    tab.page.select_option("#model", "kolors-img2img")
    tab.page.fill("#f-image", url)
    tab.page.wait_for_function("() => document.querySelector('#f-image-preview').naturalWidth === 512")
    tab.fill(prompt="a watercolour", strength="0.5", **SMALL)
    tab.page.click("#generate")
    tab.page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert "error" not in tab.page.inner_text("#result").lower()
