"""The playground at `/`, driven in real headless Chromium (Debian's `chromium`, through Playwright's
`executable_path`) against a live `kolors-api serve --model tiny` on loopback.

The tests take screenshots of the page's main states: into a temporary folder, and into
`docs/screenshots/` (README shows them) only when asked, with `KOLORS_API_SCREENSHOTS=1`, so that a
plain test run leaves the tracked pictures alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kolors_api.cli import parser
from tests.conftest import LiveServer, skip_or_fail, start_server
from tests.receiver import Receiver

ROOT = Path(__file__).resolve().parents[1]
#: The committed screenshots, rewritten only with KOLORS_API_SCREENSHOTS=1.
DOC_SHOTS = ROOT / "docs" / "screenshots"
SMALL = {"width": "512", "height": "512", "steps": "4"}
#: A job slow enough to watch and cancel (about a second a step with the tiny model on two cores).
SLOW = {"width": "2048", "height": "2048", "steps": "50"}
# Collects CSP violations the page reports, from before its first script runs.
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """conftest's module server, with webhooks to loopback allowed (the form's webhook test)."""
    srv = start_server(tiny_model, tmp_path_factory.mktemp("server"),
                       env={"KOLORS_API_SYNC_TIMEOUT_SECONDS": "120", "KOLORS_API_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"})
    yield srv
    srv.stop()


def pictures(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where screenshots go: docs/screenshots with KOLORS_API_SCREENSHOTS=1, else a temporary folder,
    and then the committed ones are the same bytes after the module as before it."""
    if os.environ.get("KOLORS_API_SCREENSHOTS") == "1":
        yield DOC_SHOTS
        return
    before = pictures(DOC_SHOTS)
    yield tmp_path_factory.mktemp("screenshots")
    assert pictures(DOC_SHOTS) == before, "a test rewrote docs/screenshots without KOLORS_API_SCREENSHOTS=1"


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

    def __init__(self, page: Any, server: LiveServer, shots: Path) -> None:
        self.page = page
        self.server = server
        self.shots = shots
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
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def csp_violations(self) -> list[str]:
        reported = self.page.evaluate("window.__csp")
        logged = [m for m in self.console if "Content Security Policy" in m]
        return [*reported, *logged]


@pytest.fixture
def tab(browser: Any, server: LiveServer, shots: Path) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    context.add_init_script(WATCH_CSP)
    page = Page(context.new_page(), server, shots)
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


def test_serve_prints_the_playground_url_and_the_api_docs_url(server: LiveServer) -> None:
    log = server.log().splitlines()
    playground = next(i for i, line in enumerate(log) if line.startswith(f"Playground: {server.url}/ "))
    assert log[playground + 1] == f"API docs: {server.url}/docs"
    assert httpx.get(f"{server.url}/docs").status_code == 200


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
    assert row.locator("button.toggle").inner_text().lower() in set(dict(commands(parser()))["keys"])  # "Enable"
    row.locator("button.toggle").click()
    tab.page.wait_for_function("() => document.querySelector('#keys-msg').textContent.startsWith('Enabled')")
    assert httpx.get(tab.server.url + "/v1/account", headers={"x-api-key": key}).status_code == 200

    # The page's actions are the CLI's, by name: `kolors-api keys disable|enable|delete`.
    cli_actions = set(dict(commands(parser()))["keys"])
    # (besides the buttons of the credits and weight fields, "Add" and "Set": `keys update` on the CLI)
    labels = {t.lower() for t in row.locator("button").all_inner_texts()} - {"add", "set"}
    assert labels == {"disable", "delete"} and labels <= cli_actions, labels

    tab.page.once("dialog", lambda d: d.accept())
    row.locator("button.delete").click()
    tab.page.wait_for_function("() => document.querySelector('#keys-msg').textContent.startsWith('Deleted')")
    assert row.count() == 0
    assert httpx.get(tab.server.url + "/v1/account", headers={"x-api-key": key}).status_code == 401


def test_a_user_key_sees_no_keys_page(tab: Page) -> None:
    user = tab.server.create_key(name="plain", credits=1)
    tab.open(key=user["key"])
    assert tab.page.inner_text("#key-msg") == "Key of plain: 1 credit."
    assert tab.page.is_hidden("#tab-keys")


def test_phone_sized_screen_has_no_sideways_scroll(browser: Any, server: LiveServer, shots: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    context.add_init_script(WATCH_CSP)
    page = Page(context.new_page(), server, shots)
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


def commands(ap: Any) -> Iterator[tuple[str, Any]]:
    """(name, subparsers by name) of each command of the CLI that has subcommands."""
    import argparse

    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                yield name, (inner[0].choices if inner else {})


def test_the_webhook_events_filter_is_checkboxes_and_the_job_gets_the_chosen_events(tab: Page) -> None:
    receiver = Receiver()
    try:
        tab.open(key=tab.server.key)
        # The array of choices of the schema is one checkbox per event, the default checked; no number box.
        group = "#f-webhook_events_filter"
        boxes = tab.page.locator(f"{group} input[type=checkbox]")
        assert [boxes.nth(i).get_attribute("value") for i in range(boxes.count())] == \
            ["start", "progress", "completed", "failed"]
        assert [boxes.nth(i).is_checked() for i in range(boxes.count())] == [False, False, True, False]
        assert tab.page.locator("input[type=number][name=webhook_events_filter]").count() == 0
        assert "undefined" not in tab.page.inner_text("#fields")

        # None checked: the page says what the server would, next to the group.
        tab.page.uncheck(f"{group} input[value=completed]")
        tab.fill(prompt="a fox with a webhook", seed="11", webhook=receiver.url, **SMALL)
        tab.page.click("#generate")
        assert tab.page.inner_text("#err-webhook_events_filter").startswith(
            "webhook_events_filter: must be a non-empty list of start, progress, completed, failed")
        assert tab.page.is_hidden("#job")

        tab.page.check(f"{group} input[value=start]")
        assert tab.page.inner_text("#err-webhook_events_filter") == ""  # a ticked box answers the message
        tab.page.check(f"{group} input[value=failed]")
        assert "webhook_events_filter" in tab.page.inner_text("#code")  # the copied code carries it too
        tab.shot("form")
        with tab.page.expect_request(lambda r: r.url.endswith("/v2/kolors") and r.method == "POST") as sent:
            tab.page.click("#generate")
        body = json.loads(sent.value.post_data)
        assert body["webhook"] == receiver.url and body["webhook_events_filter"] == ["start", "failed"]
        tab.page.wait_for_selector("#result:not([hidden])", timeout=120_000)
        request_id = tab.page.get_attribute("#job", "data-request")

        # The job holds the chosen events: a delivery for `start` (made), none for `completed`.
        with sqlite3.connect(tab.server.data_dir / "kolors-api.sqlite3") as db:
            (hook,) = db.execute("SELECT webhook FROM jobs WHERE id=?", (request_id,)).fetchone()
            events = [e for (e,) in db.execute("SELECT event FROM webhook_deliveries WHERE job_id=?", (request_id,))]
        assert json.loads(hook) == {"url": receiver.url, "events": ["start", "failed"]}
        assert events == ["start"]
        deadline = time.monotonic() + 60
        while not receiver.posts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [{k.lower(): v for k, v in p.headers.items()}["x-kolors-event"] for p in receiver.posts] == ["start"]
    finally:
        receiver.close()


def inside(box: dict[str, float] | None, width: int, height: int) -> bool:
    """The element's bounding box lies wholly inside a `width` x `height` viewport."""
    assert box is not None, "the element is not displayed"
    return box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= width and box["y"] + box["height"] <= height


@pytest.mark.parametrize(("width", "height"), [(1280, 900), (390, 844)])
def test_the_generate_button_and_the_job_are_on_screen_at_laptop_and_phone_sizes(
        browser: Any, server: LiveServer, shots: Path, width: int, height: int) -> None:
    context = browser.new_context(viewport={"width": width, "height": height})
    context.add_init_script(WATCH_CSP)
    tab = Page(context.new_page(), server, shots)
    try:
        tab.open(key=server.key)
        tab.fill(prompt="a lighthouse at dusk", **SLOW)
        path = shots / f"fit-{width}x{height}-form.png"
        tab.page.screenshot(path=str(path))  # what the window shows, not the whole page
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert inside(tab.page.locator("#generate").bounding_box(), width, height)
        # one button says Generate: the submit (the first tab is the Playground)
        texts = tab.page.locator("button").all_inner_texts()
        assert [t for t in texts if t.startswith("Generate")] == ["Generate image"], texts
        assert "Playground" in tab.page.locator("nav").inner_text()
        # the tiny model is said to draw noise; the form's hints show code as code, not backticks
        assert "draws noise, not pictures" in tab.page.inner_text("#model-note")
        hint = tab.page.locator("#hint-webhook_events_filter")
        assert "`" not in hint.inner_text() and hint.locator("code").inner_text() == "webhook"

        tab.page.click("#generate")
        tab.page.wait_for_function("() => document.querySelector('#bar').value >= 1", timeout=120_000)
        path = shots / f"fit-{width}x{height}-progress.png"
        tab.page.screenshot(path=str(path))
        assert inside(tab.page.locator("#job").bounding_box(), width, height)
        assert inside(tab.page.locator("#cancel").bounding_box(), width, height)
        tab.page.click("#cancel")
        tab.page.wait_for_selector("#job-error:not([hidden])", timeout=120_000)
        assert inside(tab.page.locator("#job-error").bounding_box(), width, height)
        assert tab.csp_violations() == []
        assert not [m for m in tab.console if m.startswith("pageerror")], tab.console
    finally:
        context.close()


def test_the_header_credits_follow_each_job_and_history_says_refunded(tab: Page) -> None:
    user = tab.server.create_key(name="budget", credits=10)
    tab.open(key=user["key"])
    assert tab.page.inner_text("#key-msg") == "Key of budget: 10 credits."
    tab.fill(prompt="a paid fox", **SMALL)  # 512x512, 4 steps: 0.04 credits
    tab.page.click("#generate")
    tab.page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    tab.page.wait_for_function("() => document.querySelector('#key-msg').textContent.includes('9.96')")
    assert tab.page.inner_text("#key-msg") == "Key of budget: 9.96 credits."
    tab.fill(prompt="a cancelled fox", **SLOW)
    tab.page.click("#generate")
    tab.page.wait_for_function("() => document.querySelector('#bar').value >= 1", timeout=120_000)
    tab.page.click("#cancel")
    tab.page.wait_for_selector("#job-error:not([hidden])", timeout=120_000)
    tab.page.click("nav [data-tab=history]")
    tab.page.wait_for_function("() => document.querySelectorAll('.history-item').length === 2")
    costs = tab.page.locator(".history-item [data-cost]").all_inner_texts()
    assert costs[0].endswith(" · refunded") and costs[1].endswith(" · 0.04 credits"), costs
    tab.shot("history-refunded")
    assert tab.page.inner_text("#key-msg") == "Key of budget: 9.96 credits."
