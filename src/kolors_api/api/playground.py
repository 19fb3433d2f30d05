"""`/`: the playground and console, a static page (`static/playground`) that speaks the public API.

The page is plain HTML, CSS and JavaScript modules shipped in the package: no build step, no CDN,
no inline script or style, so a strict Content-Security-Policy holds. The key the user pastes stays
in the browser (localStorage) and travels only in the `x-api-key` header of the page's own calls.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

from kolors_api.settings import Settings

ASSETS = Path(__file__).parent / "static" / "playground"
ASSETS_URL = "/playground"


def origin_of(url: str | None) -> str:
    """`scheme://host[:port]` of an absolute URL, or "" for anything else."""
    scheme, sep, rest = (url or "").partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        return ""
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}" if host and all(c not in host for c in " ;,'\"") else ""


def content_security_policy(settings: Settings) -> str:
    """The page's policy: its own scripts, styles and API only; images from here, from the signed
    output URLs (built from PUBLIC_URL, maybe another origin) and the `data:` previews of the events."""
    images = " ".join(filter(None, ("'self'", origin_of(settings.public_url), "data:", "blob:")))
    return ("default-src 'none'; script-src 'self'; style-src 'self'; "
            f"img-src {images}; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def playground_url(settings: Settings) -> str:
    """Where a person opens the playground: PUBLIC_URL, else the bound address (loopback for 0.0.0.0)."""
    if settings.public_url:
        return settings.public_url.rstrip("/") + "/"
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/"


def add_playground(app: FastAPI, settings: Settings) -> None:
    """Serve the page at `/` and its assets under `/playground/` with the policy above."""
    policy = content_security_policy(settings)
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="playground-assets")

    @app.get("/", include_in_schema=False)
    async def playground(request: Request) -> Response:
        return FileResponse(ASSETS / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})
