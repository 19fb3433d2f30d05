"""Logging of `serve` and `worker`: our lines at `--log-level`, the dependencies' quiet.

transformers, diffusers, huggingface_hub, boto3/botocore and torch print warnings and INFO lines at
start that mean nothing to a user of the API (a deprecated argument inside a library, a missing
optional backend). They are shown only with `--log-level debug`; their errors always are.

Example::

    configure("info")  # before the dependencies are imported: their verbosity is read from the env
"""

from __future__ import annotations

import logging
import os
import warnings

#: Loggers of dependencies, quiet (ERROR) unless the level is debug.
DEPENDENCIES = ("transformers", "diffusers", "huggingface_hub", "accelerate", "botocore", "boto3", "s3transfer",
                "urllib3", "torch", "PIL", "nudenet", "onnxruntime")
#: The variables through which some of them read their own verbosity (engine processes inherit them).
VERBOSITY_ENV = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY")
FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure(level: str, fmt: str = FORMAT) -> None:
    """Our log lines at `level` (as `fmt` writes them); the dependencies' warnings and INFO lines off
    unless it is debug."""
    logging.basicConfig(level=level.upper(), format=fmt)
    if level.lower() == "debug":
        return
    for name in VERBOSITY_ENV:
        os.environ.setdefault(name, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in DEPENDENCIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("transformers", "diffusers", "huggingface_hub", "torch", "botocore", "accelerate"):
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
    _quiet_loaded()


def _quiet_loaded() -> None:
    """transformers and diffusers keep their own verbosity once imported: set it there too."""
    import sys

    for name in ("transformers", "diffusers"):
        module = sys.modules.get(name)
        utils = getattr(module, "utils", None)
        setter = getattr(getattr(utils, "logging", None), "set_verbosity_error", None)
        if callable(setter):
            setter()
