"""`/docs`: Swagger UI from assets shipped in the package (`static/swagger-ui`), so it works offline.

The page holds no inline script: Swagger UI starts from `static/swagger-ui/init.js`, and the page is
served under a Content-Security-Policy as strict as the playground's (`script-src 'self'`, no
`unsafe-inline`), since both live on the origin where the playground keeps its key in localStorage.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

#: The vendored Swagger UI (npm `swagger-ui-dist`, Apache-2.0).
SWAGGER_UI_VERSION = "5.35.0"
ASSETS = Path(__file__).parent / "static" / "swagger-ui"
ASSETS_URL = "/docs/assets"

#: Its own scripts and styles only; `data:` icons of the stylesheet and `blob:` images of "Try it out";
#: the schema and "Try it out" calls go to this server.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{title}</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css?v={version}">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi}"></div>
<script src="{assets}/swagger-ui-bundle.js?v={version}"></script>
<script src="{assets}/init.js?v={version}"></script>
</body>
</html>
"""


def swagger_page(title: str, openapi_url: str, root: str = "") -> str:
    """The `/docs` page: Swagger UI's assets and its start-up file, the schema's URL as an attribute."""
    return PAGE.format(title=escape(title), assets=escape(f"{root}{ASSETS_URL}"), version=SWAGGER_UI_VERSION,
                       openapi=escape(f"{root}{openapi_url}"))


def add_docs(app: FastAPI) -> None:
    """Serve Swagger UI at `/docs` for `app.openapi_url`, every asset from `ASSETS` (no CDN)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return HTMLResponse(swagger_page(f"{app.title} - API docs", app.openapi_url or "/openapi.json", root),
                            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"})
