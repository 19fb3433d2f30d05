"""`/docs` in real headless Chromium: Swagger UI renders every operation of the schema under its strict
Content-Security-Policy, with no violation and no script error in the console."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.test_playground import WATCH_CSP, chromium_path

# the module's `server` fixture (tests/conftest.py) is the embedded server these tests open


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        yield b
        b.close()


def test_docs_renders_every_operation_with_no_csp_violation(browser: Any, server: LiveServer) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    operations = sum(1 for ops in spec["paths"].values() for method in ops if method != "parameters")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(WATCH_CSP)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    try:
        response = page.goto(server.url + "/docs")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        page.wait_for_selector(".opblock")
        page.wait_for_function(f"() => document.querySelectorAll('.opblock').length >= {operations}")
        assert page.locator(".opblock").count() == operations
        assert page.locator(".info .title").inner_text().startswith("kolors-api")
        # an operation opens and shows its parameters (Swagger UI's own scripts work under the policy)
        page.locator(".opblock-summary", has_text="/v2/requests/{request_id}/status").first.click()
        page.wait_for_selector(".opblock.is-open .parameters")
        violations = page.evaluate("window.__csp")
        assert violations == [], violations
        assert not [m for m in console if "Content Security Policy" in m or m.startswith("pageerror")], console
    finally:
        context.close()
