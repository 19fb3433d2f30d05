"""Which steps of a job get a preview, and how the worker takes one (never failing the job).

The engine offers a preview at every step as a zero-argument callable (see
`kolors_api.worker.engines`); the worker calls it every `preview_every(total)` steps, about
`PREVIEWS_PER_JOB` times a job, on the engine thread, and stores the bytes with the progress.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

log = logging.getLogger("kolors_api.worker")

#: About this many previews per job (none at the last step: the result follows at once).
PREVIEWS_PER_JOB = 8


def preview_every(total: int) -> int:
    """Take a preview every this many steps of a `total`-step job."""
    return max(1, math.ceil(total / PREVIEWS_PER_JOB))


def take_preview(step: int, total: int, preview: Callable[[], bytes] | None) -> bytes | None:
    """The preview of this step when it is one to preview and the engine offers one, else None.

    A preview that fails is logged and skipped: it never stops the job."""
    if preview is None or step >= total or step % preview_every(total):
        return None
    try:
        return preview()
    except Exception:
        log.warning("preview at step %d of %d failed; the job goes on without it", step, total, exc_info=True)
        return None
