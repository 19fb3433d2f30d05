"""Helpers for working with diffusers and transformers, which ship no usable types."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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
