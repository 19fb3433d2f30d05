"""The torch side: the Kolors pipeline (`Engine`), the offline `tiny` model, image encoding.

Only the worker imports this package; the API server never does (it must not import torch).
The `tiny` model builder is imported only when asked for (`build_tiny_model`, `--model tiny`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kolors_api.engine.encode import encode_image
from kolors_api.engine.pipeline import Engine, EngineOptions, GenerationOutput, resolve_model

if TYPE_CHECKING:
    from kolors_api.engine.tiny import build_tiny_model

__all__ = ["Engine", "EngineOptions", "GenerationOutput", "build_tiny_model", "encode_image", "resolve_model"]


def __getattr__(name: str) -> Any:
    if name == "build_tiny_model":
        from kolors_api.engine.tiny import build_tiny_model

        return build_tiny_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
