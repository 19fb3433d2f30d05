"""Helpers for working with diffusers and transformers, which ship no usable types, and dtypes."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def import_untyped(module: str) -> Any:
    """diffusers/transformers modules, imported lazily and typed `Any` (they ship no usable types)."""
    return importlib.import_module(module)


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence diffusers' and transformers' loading/saving progress bars (a server logs, it has no tty)."""
    modules = ("diffusers.utils.logging", "transformers.utils.logging")
    libraries = [lib for lib in map(import_untyped, modules) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


#: Weight dtypes by name (`EngineOptions.dtype`); "auto" is float16 on CUDA and float32 elsewhere.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(name: str, *, on_cuda: bool) -> torch.dtype:
    """`EngineOptions.dtype` -> a torch dtype ("auto": float16 on CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.float16 if on_cuda else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: expected auto or one of {', '.join(DTYPES)}") from None


def init_rule(module: torch.nn.Module, name: str, param: torch.Tensor) -> tuple[float | None, float]:
    """How the offline models (`tiny`, `random:*`) set a parameter: `(constant, 0)`, or `(None, std)`
    for a zero-mean normal. Biases 0, norm weights 1, embeddings N(0, 1), every other weight
    N(0, 1/fan_in) (keeps activations at unit scale)."""
    if name == "bias":
        return 0.0, 0.0
    if "norm" in type(module).__name__.lower():
        return 1.0, 0.0
    if isinstance(module, torch.nn.Embedding):
        return None, 1.0
    fan_in = param[0].numel() if param.ndim > 1 else param.numel()
    return None, fan_in**-0.5
