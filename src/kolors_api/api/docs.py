"""`/docs`: Swagger UI from assets shipped in the package (`static/swagger-ui`), so it works offline."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

#: The vendored Swagger UI (npm `swagger-ui-dist`, Apache-2.0).
SWAGGER_UI_VERSION = "5.35.0"
ASSETS = Path(__file__).parent / "static" / "swagger-ui"
ASSETS_URL = "/docs/assets"


def add_docs(app: FastAPI) -> None:
    """Serve Swagger UI at `/docs` for `app.openapi_url`, every asset from `ASSETS` (no CDN)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
                                   swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}",
                                   swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css?v={SWAGGER_UI_VERSION}",
                                   swagger_favicon_url=f"{root}{ASSETS_URL}/favicon-32x32.png")
