"""The torch side: the Kolors pipeline (`Engine`), the offline `tiny` model, image encoding.

Only the worker imports this package; the API server never does (it must not import torch).
"""

from kolors_api.engine.encode import encode_image
from kolors_api.engine.pipeline import Engine, GenerationOutput
from kolors_api.engine.tiny import build_tiny_model, resolve_model

__all__ = ["Engine", "GenerationOutput", "build_tiny_model", "encode_image", "resolve_model"]
