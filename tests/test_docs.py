"""What the docs promise about themselves: `/docs` works offline, every setting and every flag of every
command is documented, the "Not yet" list names nothing built, the licence is there."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import httpx

from kolors_api.api.app import create_app
from kolors_api.cli import parser
from kolors_api.schema import FIELDS, WEBHOOK_FIELDS
from kolors_api.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


async def test_docs_serves_swagger_ui_from_the_package_with_no_url_outside_the_server(tmp_path: Path) -> None:
    app = create_app(Settings(worker=False, data_dir=tmp_path, allowed_hosts="kolors.test"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kolors.test") as http:
        page = await http.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in page.text
        # Offline: the page names no other host (no CDN), and everything it loads is served here.
        assert re.findall(r"https?://[^\s\"'<>]+", page.text) == []
        assets = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", page.text)
        assert {a.split("?")[0] for a in assets} == {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
                                                     "/docs/assets/favicon-32x32.png", "/docs/assets/init.js"}
        for asset in assets:
            r = await http.get(asset)
            assert r.status_code == 200 and len(r.content) > 500, asset
        js = await http.get("/docs/assets/swagger-ui-bundle.js")
        assert "javascript" in js.headers["content-type"] and b"SwaggerUIBundle" in js.content
        assert (await http.get("/openapi.json")).json()["info"]["title"] == "kolors-api"
        assert (await http.get("/redoc")).status_code == 404  # ReDoc would need a CDN


async def test_docs_runs_no_inline_script_under_a_csp_as_strict_as_the_playgrounds(tmp_path: Path) -> None:
    app = create_app(Settings(worker=False, data_dir=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        page = await http.get("/docs")
        csp = page.headers["content-security-policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                          "frame-ancestors 'none'", "base-uri 'none'"):
            assert directive in csp, csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        # every <script> loads a file; no inline handler or style either
        assert re.findall(r"<script(?![^>]*\bsrc=)", page.text) == []
        assert not re.findall(r"\son[a-z]+=|<style|\sstyle=", page.text)
        assert "/openapi.json" in page.text


def test_every_setting_is_documented_in_docs_settings_md_and_readme() -> None:
    fields = set(Settings.model_fields)
    settings_md = (ROOT / "docs" / "settings.md").read_text().split("## Client side")[0]
    # docs/settings.md: one table row per setting, `KOLORS_API_NAME`, and no row for a setting that is not there.
    rows = {name.lower() for name in re.findall(r"^\| `KOLORS_API_([A-Z_]+)`", settings_md, re.M)}
    assert rows == fields
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    assert {name.lower() for name in re.findall(r"`([A-Z][A-Z_]*[A-Z])`", section)} == fields


def test_the_licence_is_the_apache_2_0_text_that_pyproject_names() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11000
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_the_cancel_route_is_documented() -> None:
    for doc in ("README.md", "docs/api.md"):
        assert re.search(r"POST \S*/v2/requests/\S+/cancel", (ROOT / doc).read_text()), doc


def cli_sections() -> dict[str, str]:
    """docs/cli.md cut at its `## \\`kolors-api COMMAND\\`` headings: {command: its section}."""
    parts = re.split(r"^## `kolors-api ([\w-]+)`", (ROOT / "docs" / "cli.md").read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def commands(ap: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                       argparse.ArgumentParser]]:
    """Every (sub)command of the parser, with its path: ("keys", "create")..."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_every_command_and_every_flag_is_in_docs_cli_md_under_its_command() -> None:
    sections = cli_sections()
    found = list(commands(parser()))
    assert {path[0] for path, _ in found} == set(sections)  # a section per command, no section of none
    for path, sub in found:
        section = sections[path[0]]
        assert mentions(section, path[-1]), path
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert mentions(section, flag), f"docs/cli.md, `kolors-api {' '.join(path)}`: {flag} is missing"
    # serve's table: one row a flag
    rows = set(re.findall(r"^\| `(--[\w-]+)`", sections["serve"], re.M))
    serve = dict(found)[("serve",)]
    assert rows == {f for a in serve._actions for f in a.option_strings if f not in ("-h", "--help")}


def test_the_not_yet_list_names_nothing_that_is_built() -> None:
    text = (ROOT / "docs" / "README.md").read_text()
    not_yet = text.split("## Not yet", 1)[1].split("\n## ", 1)[0].split("\n\n")
    planned = "\n".join(p for p in not_yet if p.startswith("- "))  # the list itself, not the prose after it
    assert planned
    words = re.findall(r"`([^`]+)`", planned)
    flags = {f for _, sub in commands(parser()) for a in sub._actions for f in a.option_strings}
    names = {path[-1] for path, _ in commands(parser())}
    app = create_app(Settings(worker=False, data_dir=ROOT / ".kolors-api-never-made"))
    routes = {getattr(route, "path", "") for route in app.routes}
    fields = {*FIELDS, *WEBHOOK_FIELDS}
    for word in words:
        bare = word.split(" ")[-1].split("?")[0]  # `GET /v2/x` -> /v2/x; `kolors-api random-model` -> random-model
        assert bare not in flags | names | routes | fields, f"docs/README.md's Not yet names {word!r}, which is built"
    # what the server does in headers: Idempotency-Key is built
    assert "Idempotency-Key" not in planned


def cited_but_missing(text: str) -> list[str]:
    """The files, folders and `kolors_api.…` names a page cites in backticks that do not exist: a file
    or folder under the repository or `src/kolors_api/`; a module, or a class, function, method or
    constant defined in its module."""
    src = ROOT / "src" / "kolors_api"
    missing = []
    for token in re.findall(r"`([^`\s]+)`", text):
        if re.fullmatch(r"[\w./-]+\.py|[a-z_]+/", token):
            if not any((base / token).exists() for base in (ROOT, src)):
                missing.append(token)
        elif token.startswith("kolors_api."):
            parts = token.split(".")[1:]
            for n in range(len(parts), 0, -1):  # the longest prefix that is a module
                path = src.joinpath(*parts[:n])
                module = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
                if module.is_file():
                    break
            else:
                missing.append(token)
                continue
            code, names = module.read_text(), parts[n:]
            patterns = [rf"^(class|def|async def) {names[0]}\b|^{names[0]}\s*[:=]" if names else ".",
                        *(rf"^\s+(async def|def) {name}\b|^\s+{name}\s*[:=]" for name in names[1:])]
            if len(names) > 2 or not all(re.search(p, code, re.M) for p in patterns):
                missing.append(token)
    return missing


def test_the_architecture_page_cites_only_modules_and_names_that_exist() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert cited_but_missing(page) == []
    # and the check finds what is not there
    wrong = ["jobs/queue.py", "kolors_api.worker.company.WaitRule", "kolors_api.jobs.batching.gone",
             "kolors_api.jobs.base.JobStore.claim_compatible"]
    right = ["worker/", "kolors_api.jobs.batching", "kolors_api.jobs.base.JobStore.claim_batch"]
    assert cited_but_missing(" ".join(f"`{token}`" for token in wrong + right)) == wrong
