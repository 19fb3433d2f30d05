"""Batching, in one place: which queued jobs may share one pipeline call with a claimed one, in which
order they join it, and how long a claimed job waits for them.

- **Shapes.** Jobs share a call when they have the same `SHAPE_FIELDS` (width, height, steps, scheduler, cfg, and for
pictures in the strength of image to image and the IP-Adapter's scale, None where a job has none: a
text-to-image job never shares a call with an image-to-image one, nor a job with a reference with one
without, nor two references of different scales):
prompts, negative prompts, seeds, number_of_images and output formats may differ. A batch is
bounded by `BatchLimits`: images per call (each job's number_of_images counts) and images × pixels
per call. The claimed job (the head of the queue) is always taken, even alone over the pixel
budget; the others are queued compatible jobs that still fit, looked for among the `window` first
in fair order.
- **The fair fill** (`BatchBuilder.choose`): the company joins in the fair order across keys
  (`kolors_api.jobs.fair`); each store's `claim_batch` hands it the first queued jobs of each key
  and claims what it chooses.
- **The wait for company** (`WaitRule`, `StepClock`, `gather`, for `batch_wait_ms` auto). Batching
  pays only when jobs share a call, and jobs that arrive a few milliseconds apart (users on their
  own connections) find the worker idle: the first is claimed alone and the others wait for its
  whole call. Waiting costs every job in hand that long, so the rule waits only where company is
  likely and cheap to wait for, judged from what the worker sees:

  - a job that was queued for longer than `busy_after` steps found the worker busy: batches form
    from the backlog, and there is no wait at all;
  - otherwise (an idle worker) a lone job waits `probe` of one step for a second arrival: about 1 %
    of a 25-step call;
  - every job that joins meanwhile moves the deadline to its sighting plus the gap the batch's own
    arrivals show (twice the widest of its last three gaps, at least `probe` of a step);
  - never more than `most` steps in all, and not at all once the batch is full.

  A step's time is what the worker measured on its own calls for that image size (`StepClock`),
  before the first call `default_step`. Clocks: sightings are the worker's monotonic time; the gaps
  are between the jobs' `created_at` (one clock, the API's), so a skew between machines moves
  neither. While it waits, the worker sleeps until the store says a job was queued
  (`JobStore.wait_for_work`), never polling.
"""

from __future__ import annotations

import copy
import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kolors_api.jobs.base import JobStore, Lease
from kolors_api.jobs.fair import KeyQueue, work

#: The parameters jobs must share to run in one pipeline call.
SHAPE_FIELDS = ("width", "height", "steps", "scheduler", "cfg", "strength", "ip_adapter_scale")


@dataclass(frozen=True)
class BatchLimits:
    """How large one pipeline call may grow (the settings `max_batch_images`, `max_batch_megapixels`)."""

    max_images: int = 1  # images per call, number_of_images of every job counted
    max_pixels: int = 0  # images × width × height per call; 0 = no pixel budget
    window: int = 256  # how many of the oldest queued jobs are looked at for company

    @property
    def batching(self) -> bool:
        return self.max_images > 1


def shape(params: Mapping[str, Any]) -> tuple[Any, ...]:
    """What jobs must have in common to share a call."""
    return tuple(params.get(name) for name in SHAPE_FIELDS)


def images(params: Mapping[str, Any]) -> int:
    return int(params.get("number_of_images", 1))


def pixels(params: Mapping[str, Any]) -> int:
    """Images × width × height of a job: its share of the pixel budget."""
    return images(params) * int(params["width"]) * int(params["height"])


class BatchBuilder:
    """Grows a batch around a claimed job: `fits(params)` says whether a job may join, `add` takes it."""

    def __init__(self, limits: BatchLimits, first: Mapping[str, Any]) -> None:
        self.limits = limits
        self.shape = shape(first)
        self.images = images(first)
        self.pixels = pixels(first)

    @property
    def full(self) -> bool:
        return self.images >= self.limits.max_images or (
            self.limits.max_pixels > 0 and self.pixels >= self.limits.max_pixels)

    def fits(self, params: Mapping[str, Any]) -> bool:
        if shape(params) != self.shape or self.images + images(params) > self.limits.max_images:
            return False
        return self.limits.max_pixels <= 0 or self.pixels + pixels(params) <= self.limits.max_pixels

    def add(self, params: Mapping[str, Any]) -> None:
        self.images += images(params)
        self.pixels += pixels(params)

    @property
    def window(self) -> int:
        """How many queued jobs `claim_batch` hands to `choose`, in all."""
        return self.limits.window

    def choose(self, queues: list[KeyQueue]) -> list[tuple[str, dict[str, Any]]]:
        """The jobs that would join, in fair order: each time the key of the smallest tag gives its oldest
        job that fits, and its tag moves by that job's work; a key with none that fits drops out. This
        batch is left as it is (the store `add`s each job it claims)."""
        grown = copy.copy(self)
        heap = [(q.start, q.key, i) for i, q in enumerate(queues) if q.jobs]
        heapq.heapify(heap)
        chosen: list[tuple[str, dict[str, Any]]] = []
        while heap and not grown.full:
            start, key, i = heapq.heappop(heap)
            q = queues[i]
            pick = next((j for j, (_, p) in enumerate(q.jobs) if grown.fits(p)), None)
            if pick is None:
                continue
            job_id, params = q.jobs.pop(pick)
            grown.add(params)
            chosen.append((job_id, params))
            if q.jobs:
                heapq.heappush(heap, (start + work(params) / q.weight, key, i))
        return chosen


@dataclass(frozen=True)
class WaitRule:
    """The auto rule's constants, in steps of the head's image size (see the module docstring)."""

    probe: float = 0.25
    most: float = 2.0
    busy_after: float = 1.0
    default_step: float = 0.02  # seconds a step is taken to last before one was measured

    def deadline(self, *, claimed_at: float, head_age: float, step: float | None, seen: Sequence[float],
                 arrivals: Sequence[float], full: bool) -> float:
        """Until when (monotonic seconds) to look for company; `claimed_at` means not at all.

        `head_age`: seconds the head job was queued before its claim; `step`: a measured step of
        its size, or None; `seen`: when each job of the batch after the head was first seen;
        `arrivals`: the `created_at` of every job of the batch, head included."""
        step = step if step and step > 0 else self.default_step
        if full or head_age > self.busy_after * step:
            return claimed_at
        ordered = sorted(arrivals)
        gaps = [b - a for a, b in zip(ordered, ordered[1:], strict=False)][-3:]
        gap = min(max(2 * max(gaps, default=0.0), self.probe * step), self.most * step)
        last = max(seen, default=claimed_at)
        return min(claimed_at + self.most * step, max(last, claimed_at) + gap)


@dataclass
class StepClock:
    """Seconds per denoising step by image size, measured on the worker's own engine calls (the
    latest call of a size counts half: it follows a change of load within a few calls)."""

    steps: dict[tuple[int, int], float] = field(default_factory=dict)

    def observe(self, width: int, height: int, steps: int, images: int, seconds: float) -> None:
        """Count one engine call. A call of several images is scaled down to one image's step by
        the square root of its images (batched steps cost less than their images, more than one)."""
        if steps <= 0 or seconds <= 0:
            return
        one = seconds / steps / max(1, images) ** 0.5
        old = self.steps.get((width, height))
        self.steps[(width, height)] = one if old is None else (old + one) / 2

    def step(self, width: int, height: int) -> float | None:
        """One step of an image of this size: measured, else scaled by area from the nearest size
        measured, else None."""
        if (width, height) in self.steps:
            return self.steps[(width, height)]
        if not self.steps:
            return None
        (w, h), seconds = min(self.steps.items(), key=lambda item: abs(item[0][0] * item[0][1] - width * height))
        return seconds * (width * height) / (w * h)


async def gather(store: JobStore, worker_id: str, lease_seconds: float, head: Lease, limits: BatchLimits, *,
                 wait_ms: int, rule: WaitRule, clock: StepClock,
                 on_error: Callable[[BaseException], None]) -> list[Lease]:
    """The company of `head` in its pipeline call: the queued jobs that fit (`claim_batch`), and those
    that come while it waits (`wait_ms`: -1 the auto rule, `rule`, on the step times of `clock`; else
    a fixed time), never holding the head back longer. A store error ends the wait (`on_error`):
    the head runs with the company it has."""
    if not limits.batching:
        return []
    batch = BatchBuilder(limits, head.job.params)
    claimed_at = time.monotonic()
    head_age = max(0.0, time.time() - head.job.created_at)
    step = clock.step(int(head.job.params["width"]), int(head.job.params["height"]))
    leases: list[Lease] = []
    seen: list[float] = []
    while True:
        try:
            got = await store.claim_batch(worker_id, lease_seconds, batch)
        except Exception as exc:
            on_error(exc)
            return leases
        now = time.monotonic()
        leases += got
        seen += [now] * len(got)
        if wait_ms >= 0:
            deadline = claimed_at + wait_ms / 1000
        else:
            deadline = rule.deadline(claimed_at=claimed_at, head_age=head_age, step=step, seen=seen,
                                     full=batch.full,
                                     arrivals=[head.job.created_at, *(lease.job.created_at for lease in leases)])
        left = deadline - now
        if batch.full or left <= 0:
            return leases
        try:  # woken by the next submit (SQLite: told by the API's process; Redis: its wake list)
            await store.wait_for_work(left)
        except Exception as exc:
            on_error(exc)
            return leases
