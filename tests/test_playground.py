"""The playground at `/`, driven in real headless Chromium (Debian's `chromium`, through Playwright's
`executable_path`) against a live `kolors-api serve --model tiny` on loopback.

The tests write screenshots of the page's main states to `docs/screenshots/` (README shows two).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "screenshots"
SMALL = {"width": "512", "height": "512", "steps": "4"}
#: A job slow enough to watch and cancel (about a second a step with the tiny model on two cores).
SLOW = {"width": "2048", "height": "2048", "steps": "50"}
# Collects CSP violations the page reports, from before its first script runs.
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


def chromium_path() -> str:
    path = os.environ.get("KOLORS_API_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        skip_or_fail("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        skip_or_fail(f"playwright is not installed (the dev extra): {exc}")
    executable = chromium_path()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


class Page:
    """A browser tab on the playground, with what it logged."""

    def __init__(self, page: Any, server: LiveServer) -> None:
        self.page = page
        self.server = server
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def open(self, key: str | None = None) -> Any:
        response = self.page.goto(self.server.url + "/")
        self.page.wait_for_selector("#gen-form[data-ready]")
        if key is not None:
            self.use_key(key)
        return response

    def use_key(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("#key-save")
        self.page.wait_for_function("() => document.querySelector('#key-msg').textContent.startsWith('Key of')"
                                    " || document.querySelector('#key-msg').classList.contains('error')")

    def fill(self, **fields: str) -> None:
        for name, value in fields.items():
            self.page.fill(f"#f-{name}", value)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def csp_violations(self) -> list[str]:
        reported = self.page.evaluate("window.__csp")
        logged = [m for m in self.console if "Content Security Policy" in m]
        return [*reported, *logged]


@pytest.fixture
def tab(browser: Any, server: LiveServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    context.add_init_script(WATCH_CSP)
    page = Page(context.new_page(), server)
    yield page
    assert page.csp_violations() == []
    assert not [m for m in page.console if m.startswith("pageerror")], page.console
    context.close()


def test_the_page_is_served_from_the_package_with_a_strict_csp(server: LiveServer) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                      "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "img-src 'self' data:" in csp  # signed output URLs (same origin here) and data: previews
    # No CDN: the page names no other host, and everything it loads is served here.
    assert re.findall(r"https?://", r.text) == []
    assets = re.findall(r"(?:src|href)=\"(playground/[^\"]+)\"", r.text)
    assert sorted(assets) == ["playground/app.js", "playground/style.css"]
    for name in ("app.js", "api.js", "form.js", "console.js", "snippets.js", "dom.js", "style.css"):
        asset = httpx.get(f"{server.url}/playground/{name}")
        assert asset.status_code == 200 and len(asset.content) > 500, name
        assert b"http://" not in asset.content and b"https://" not in asset.content, name
    assert "javascript" in httpx.get(server.url + "/playground/app.js").headers["content-type"]
    # no inline script or style anywhere in the page
    assert "<style" not in r.text and " style=" not in r.text and re.findall(r"<script(?![^>]*src=)", r.text) == []


async def test_with_a_public_url_the_signed_images_of_that_origin_are_allowed(tmp_path: Path) -> None:
    from kolors_api.api.app import create_app
    from kolors_api.api.playground import playground_url
    from kolors_api.settings import Settings

    settings = Settings(worker=False, data_dir=tmp_path, public_url="https://img.example.com:8443/kolors")
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.internal") as http:
        r = await http.get("/")
    assert "img-src 'self' https://img.example.com:8443 data: blob:;" in r.headers["content-security-policy"]
    assert playground_url(settings) == "https://img.example.com:8443/kolors/"
    assert playground_url(Settings(worker=False, host="0.0.0.0", port=9000)) == "http://127.0.0.1:9000/"
    assert playground_url(Settings(worker=False, host="::1", port=9000)) == "http://[::1]:9000/"


def test_serve_prints_the_playground_url(server: LiveServer) -> None:
    assert f"Playground: {server.url}/" in server.log()


def test_a_bad_key_gets_a_clear_401_message(tab: Page) -> None:
    tab.open(key="kol_not_a_key")
    message = tab.page.inner_text("#key-msg")
    assert "401" in message and "Paste a valid API key" in message
    # The key stays in localStorage only: never in the URL or a cookie.
    assert "kol_not_a_key" not in tab.page.url
    assert tab.page.context.cookies() == []
    assert tab.page.evaluate("localStorage.getItem('kolors-api.key')") == "kol_not_a_key"


def test_generate_shows_progress_and_the_image(tab: Page) -> None:
    tab.open(key=tab.server.key)
    assert "admin" in tab.page.inner_text("#key-msg")
    assert not tab.page.is_hidden("#tab-keys")
    # the form follows the schema: defaults and ranges from GET /v1/models
    assert tab.page.input_value("#f-steps") == "25"
    assert tab.page.get_attribute("#f-width", "min") == "512"
    assert tab.page.get_attribute("#f-width", "step") == "8"
    assert "DPMSolverMultistepScheduler" in tab.page.inner_text("#f-scheduler")
    tab.fill(prompt="a red fox in the snow", seed="42", **SMALL)
    tab.shot("form")
    tab.page.evaluate("""() => {
      window.__steps = [];
      new MutationObserver(() => window.__steps.push(document.querySelector('#step-text').textContent))
        .observe(document.querySelector('#step-text'), {childList: true, characterData: true, subtree: true});
    }""")

    # the keyboard submits: Ctrl+Enter in the form
    tab.page.focus("#f-prompt")
    tab.page.keyboard.press("Control+Enter")
    tab.page.wait_for_selector("#result:not([hidden])", timeout=120_000)

    steps = [s for s in tab.page.evaluate("window.__steps") if s]
    assert steps and steps[-1] == "step 4/4", steps
    img = tab.page.locator("#images img.output")
    assert img.count() == 1
    tab.page.wait_for_function("() => document.querySelector('#images img').naturalWidth === 512")
    assert tab.page.inner_text("[data-meta=seed]") == "42"
    assert re.fullmatch(r"\d+\.\d\d s", tab.page.inner_text("[data-meta='inference time']"))
    link = tab.page.get_attribute("#images a[download]", "href")
    assert "sig=" in link
    assert httpx.get(link).content[:4] == b"RIFF"  # the download link works without a key
    tab.shot("result")

    # history: the request with its thumbnail through the signed URL; re-run puts its parameters back
    tab.page.click("nav [data-tab=history]")
    item = tab.page.locator(".history-item").first
    item.locator("img.thumb").wait_for()
    tab.page.wait_for_function("() => document.querySelector('.history-item img.thumb').naturalWidth > 0")
    tab.page.click("nav [data-tab=generate]")
    tab.page.click("#reset")
    assert tab.page.input_value("#f-steps") == "25"
    tab.page.click("nav [data-tab=history]")
    tab.page.locator(".history-item .rerun").first.click()
    assert tab.page.input_value("#f-prompt") == "a red fox in the snow"
    assert tab.page.input_value("#f-seed") == "42" and tab.page.input_value("#f-steps") == "4"

    # account: credits, limits, usage
    tab.page.click("nav [data-tab=account]")
    tab.page.wait_for_selector("#account dd")
    text = tab.page.inner_text("#account")
    assert "unlimited" in text and "Credits spent" in text and "Max concurrency" in text


def test_a_slow_job_shows_a_preview_and_cancel_ends_it(tab: Page) -> None:
    tab.open(key=tab.server.key)
    tab.fill(prompt="a slow lighthouse", **SLOW)
    tab.page.click("#generate")
    tab.page.wait_for_function("() => document.querySelector('#bar').value >= 2", timeout=120_000)
    assert re.fullmatch(r"step \d+/50", tab.page.inner_text("#step-text"))
    tab.page.wait_for_selector("#preview:not([hidden])", timeout=60_000)
    assert tab.page.get_attribute("#preview", "src").startswith("data:image/webp;base64,")
    tab.shot("progress")
    request_id = tab.page.get_attribute("#job", "data-request")

    tab.page.click("#cancel")
    tab.page.wait_for_selector("#job-error:not([hidden])", timeout=120_000)
    assert tab.page.inner_text("#job-error") == "FAILED: cancelled"
    status = httpx.get(f"{tab.server.url}/v2/requests/{request_id}/status", headers=tab.server.headers())
    assert status.status_code == 422 and status.json()["error"] == "cancelled"


def test_a_bad_width_is_shown_next_to_the_field_in_the_servers_words(tab: Page) -> None:
    tab.open(key=tab.server.key)
    tab.fill(prompt="a fox", width="513")
    tab.page.click("#generate")
    shown = tab.page.inner_text("#err-width")
    server = httpx.post(tab.server.url + "/v2/kolors", json={"prompt": "a fox", "width": 513},
                        headers=tab.server.headers())
    assert server.status_code == 400
    assert shown == server.json()["error"] == "width: must be a multiple of 8, got 513 (nearest valid: 512 or 520)"
    assert tab.page.get_attribute("#f-width", "aria-invalid") == "true"
    assert tab.page.evaluate("document.activeElement.id") == "f-width"

    # What only the server can judge comes back as its 400, next to the field it names.
    tab.fill(prompt="\u200b\u200b", width="512")
    tab.page.click("#generate")
    tab.page.wait_for_function("() => document.querySelector('#err-prompt').textContent !== ''")
    assert tab.page.inner_text("#err-prompt") == "prompt: must not be empty"
    assert tab.page.is_hidden("#job")


def run_snippet(lang: str, code: str, server: LiveServer, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KOLORS_API_KEY": server.key}
    args = ["bash", "-c", code] if lang == "curl" else [sys.executable, "-c", code]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("lang", ["segmind", "curl", "openai"])
def test_the_copied_snippet_runs_against_the_server(tab: Page, lang: str, tmp_path: Path) -> None:
    tab.open(key=tab.server.key)
    tab.fill(prompt="a 'quoted' \"fox\"", seed="7", **SMALL)
    tab.page.click(f".code-tab[data-lang={lang}]")
    tab.page.click("#copy-code")
    tab.page.wait_for_function("() => document.querySelector('#copy-msg').textContent === 'Copied.'")
    code = tab.page.evaluate("navigator.clipboard.readText()")
    assert tab.server.key not in code and "KOLORS_API_KEY" in code
    assert tab.server.url in code

    proc = run_snippet(lang, code, tab.server, tmp_path)

    assert proc.returncode == 0, (code, proc.stdout, proc.stderr)
    if lang == "segmind":
        assert re.search(r"\['http://127\.0\.0\.1:\d+/v2/requests/\w+/outputs/0\.webp\?", proc.stdout)
    elif lang == "curl":
        assert (tmp_path / "out.webp").read_bytes()[:4] == b"RIFF"
        assert "x-seed: 7" in proc.stdout.lower()
    else:
        assert (tmp_path / "out-0.webp").read_bytes()[:4] == b"RIFF"


def test_an_admin_creates_a_key_on_the_keys_page_and_it_works(tab: Page) -> None:
    tab.open(key=tab.server.key)
    tab.page.click("#tab-keys")
    tab.page.fill("#key-create [name=name]", "phone app")
    tab.page.fill("#key-create [name=credits]", "5")
    tab.page.fill("#key-create [name=rate_limit]", "10/min")
    tab.page.fill("#key-create [name=max_concurrency]", "2")
    tab.page.fill("#key-create [name=weight]", "2")
    tab.page.click("#key-create button[type=submit]")
    tab.page.wait_for_selector("#new-key:not([hidden])")
    key = tab.page.inner_text("#new-key-value")
    assert key.startswith("kol_")
    tab.page.click("#new-key-copy")
    tab.page.wait_for_function("() => document.querySelector('#keys-msg').textContent === 'Key copied.'")
    assert tab.page.evaluate("navigator.clipboard.readText()") == key
    row = tab.page.locator("#keys-table tr[data-name='phone app']")
    assert row.locator(".credits").inner_text() == "5"
    tab.shot("keys")

    # the new key works, with the limits set on the page
    account = httpx.get(tab.server.url + "/v1/account", headers={"x-api-key": key}).json()
    assert account["credits"] == 5 and account["limits"] == {"rate_limit": "10/min", "max_concurrency": 2,
                                                             "weight": 2}
    r = httpx.post(tab.server.url + "/v1/kolors", headers={"x-api-key": key}, timeout=120,
                   json={"prompt": "a key made in the browser", "width": 512, "height": 512, "steps": 2})
    assert r.status_code == 200 and r.content[:4] == b"RIFF"

    assert row.locator("input.weight-value").input_value() == "2"
    row.locator("input.weight-value").fill("0.5")
    row.locator("button.set-weight").click()
    tab.page.wait_for_function("() => document.querySelector('#keys-msg').textContent.startsWith('Set the weight')")
    assert httpx.get(tab.server.url + "/v1/account", headers={"x-api-key": key}).json()["limits"]["weight"] == 0.5

    row.locator("input.add-amount").fill("3")
    row.locator("button.add").click()
    tab.page.wait_for_function("() => document.querySelector('#keys-msg').textContent.startsWith('Added 3')")
    account = httpx.get(tab.server.url + "/v1/account", headers={"x-api-key": key}).json()
    assert account["credits"] == pytest.approx(8 - 0.02, abs=1e-6)

    row.locator("button.toggle").click()
    tab.page.wait_for_function("() => document.querySelector('#keys-msg').textContent.startsWith('Disabled')")
    assert httpx.get(tab.server.url + "/v1/account", headers={"x-api-key": key}).status_code == 403
    tab.use_key(key)  # the page says why a disabled key is refused
    assert tab.page.inner_text("#key-msg").startswith("Not allowed with this key (403): ")
    tab.use_key(tab.server.key)
    tab.page.click("#tab-keys")
    row.locator("button.toggle").click()
    tab.page.wait_for_function("() => document.querySelector('#keys-msg').textContent.startsWith('Enabled')")
    assert httpx.get(tab.server.url + "/v1/account", headers={"x-api-key": key}).status_code == 200

    tab.page.once("dialog", lambda d: d.accept())
    row.locator("button.revoke").click()
    tab.page.wait_for_function("() => document.querySelector('#keys-msg').textContent.startsWith('Revoked')")
    assert row.count() == 0
    assert httpx.get(tab.server.url + "/v1/account", headers={"x-api-key": key}).status_code == 401


def test_a_user_key_sees_no_keys_page(tab: Page) -> None:
    user = tab.server.create_key(name="plain", credits=1)
    tab.open(key=user["key"])
    assert tab.page.inner_text("#key-msg") == "Key of plain: 1 credits."
    assert tab.page.is_hidden("#tab-keys")


def test_phone_sized_screen_has_no_sideways_scroll(browser: Any, server: LiveServer) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    context.add_init_script(WATCH_CSP)
    page = Page(context.new_page(), server)
    page.open(key=server.key)
    assert page.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # one column: the output sits below the form
    form = page.page.locator("#gen-form").bounding_box()
    out = page.page.locator(".out").bounding_box()
    assert out["y"] >= form["y"] + form["height"]
    page.shot("phone")
    assert page.csp_violations() == []
    context.close()


def test_the_api_imports_no_browser_driver() -> None:
    code = "import sys, kolors_api.api.app; sys.exit('playwright' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_without_the_event_stream_the_page_polls_the_status(tab: Page) -> None:
    # The network drops every events request (a proxy that does not pass streams): the page
    # follows the job through GET /v2/requests/{id}/status instead and still shows the result.
    tab.page.route("**/events?previews=1", lambda route: route.abort())
    tab.open(key=tab.server.key)
    tab.fill(prompt="a fox without a stream", seed="9", **SMALL)
    tab.page.click("#generate")
    tab.page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert tab.page.inner_text("[data-meta=seed]") == "9"
    tab.console[:] = [m for m in tab.console if "ERR_FAILED" not in m]


def test_the_page_works_from_the_keyboard(tab: Page) -> None:
    tab.open()
    tab.page.keyboard.press("Tab")  # the first stop is the skip link, then the key
    assert tab.page.evaluate("document.activeElement.className") == "skip"
    tab.page.keyboard.press("Tab")
    assert tab.page.evaluate("document.activeElement.id") == "api-key"
    tab.page.keyboard.type(tab.server.key)
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_function("() => document.querySelector('#key-msg').textContent.startsWith('Key of')")
    tab.page.focus("nav [data-tab=account]")
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_selector("#panel-account:not([hidden]) #account dd")
    tab.page.focus("nav [data-tab=generate]")
    tab.page.keyboard.press("Enter")
    tab.page.focus("#f-prompt")
    tab.page.keyboard.type("a fox typed on a keyboard")
    for name, value in SMALL.items():
        tab.page.focus(f"#f-{name}")
        tab.page.keyboard.press("Control+A")
        tab.page.keyboard.type(value)
    tab.page.focus("#generate")
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_selector("#result:not([hidden])", timeout=120_000)
