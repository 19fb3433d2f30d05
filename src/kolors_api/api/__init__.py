"""The HTTP API (FastAPI). Importing it never imports torch."""

from kolors_api.api.app import Service, create_app

__all__ = ["Service", "create_app"]
