"""Weighted fair queuing across API keys, the rule both stores follow (start-time fair queuing).

Each key with queued work has a *start tag* in virtual time; the next claim takes the head (oldest
queued job) of the key with the smallest tag, ties to the smaller key id. Serving a job of `work`
moves its key's tag to `finish = start + work / weight`, and the store's virtual time to at least
`start`. A key that becomes active (its first queued job while it had none) starts at
`max(its last finish tag, the virtual time)`: it is served next or nearly next, but an idle key
banks no credit, so it cannot monopolise the queue afterwards. Over any stretch in which keys stay
backlogged, the work served to each is proportional to its weight (within one job's work).

A job's work is its images × pixels × steps, in units of the reference request (one 1024×1024
image, 25 steps): the price formula without credits, so that keys without credits are shared too.
Jobs without a key share one queue, `NO_KEY`, of weight 1.

Within a key jobs go first in, first out, by their *odometer*: the key's enqueued work before
them. A batch (`claim_batch`) is filled in the same fair order among jobs of the head's
shape (`kolors_api.jobs.batching`). A job whose lease ran out is handed out again before any queued job (it was
served once already: it is not charged twice).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The fair-queue id of jobs submitted without a key.
NO_KEY = ""
#: A key's share when it sets none, and the bounds of `weight`.
DEFAULT_WEIGHT = 1.0
MAX_WEIGHT = 1e6
MIN_WEIGHT = 1e-6
#: The work of the reference request (one 1024×1024 image, 25 steps).
REFERENCE = 1024 * 1024 * 25


def work(params: Mapping[str, Any]) -> float:
    """Images × pixels × steps run of a job, in reference requests (> 0; image to image runs
    int(steps × strength) steps)."""
    n = int(params.get("number_of_images", 1) or 1)
    w, h = int(params.get("width", 1024) or 1024), int(params.get("height", 1024) or 1024)
    steps = int(params.get("steps", 25) or 25)
    if params.get("strength") is not None:
        steps = max(1, int(steps * float(params["strength"])))
    return max(n * w * h * steps, 1) / REFERENCE


def weight_of(value: object) -> float:
    """A stored weight as a number (absent or unreadable: the default)."""
    try:
        weight = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_WEIGHT
    return weight if math.isfinite(weight) and weight > 0 else DEFAULT_WEIGHT


def valid_weight(value: float) -> bool:
    return math.isfinite(value) and MIN_WEIGHT <= value <= MAX_WEIGHT


def activate(finish: float, vtime: float) -> float:
    """The start tag of a key that becomes active: no banked credit."""
    return max(finish, vtime)


def served(start: float, vtime: float, job_work: float, weight: float) -> tuple[float, float]:
    """(the key's finish tag, the new virtual time) once a job of `job_work` of a key at `start` is taken."""
    return start + job_work / weight, max(vtime, start)


def bound(tag: float, start: float, weight: float, head_odo: float) -> float:
    """The odometer below which a key's queued jobs come before a job of start tag `tag`: its job at
    odometer `o` starts at `start + (o - head_odo) / weight` (queue_position)."""
    return head_odo + (tag - start) * weight


@dataclass
class KeyQueue:
    """A key with queued work as a batch's fill sees it (`batching.BatchBuilder.choose`): its start tag,
    weight and first queued jobs."""

    key: str
    start: float
    weight: float
    jobs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (job id, params), FIFO


def per_key(window: int, keys: int) -> int:
    """How many queued jobs of each key a store hands to a batch's fill (`claim_batch`): `window` in all."""
    return max(1, window // max(keys, 1))
