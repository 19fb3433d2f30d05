"""How long a claimed job waits for company before its engine call starts (`batch_wait_ms` auto).

Batching pays only when jobs share a call, and jobs that arrive a few milliseconds apart (users on
their own connections) find the worker idle: the first is claimed alone and the others wait for
its whole call. Waiting costs every job in hand that long, so the rule waits only where company is
likely and cheap to wait for, judged from what the worker sees:

- a job that was queued for longer than `busy_after` steps found the worker busy: batches form from
  the backlog, and there is no wait at all;
- otherwise (an idle worker) a lone job waits `probe` of one step for a second arrival: about 1 % of
  a 25-step call;
- every job that joins meanwhile moves the deadline to its sighting plus the gap the batch's own
  arrivals show (twice the widest of its last three gaps, at least `probe` of a step);
- never more than `most` steps in all, and not at all once the batch is full.

A step's time is what the worker measured on its own calls for that image size (`StepClock`),
before the first call `default_step`. Clocks: sightings are the worker's monotonic time; the gaps
are between the jobs' `created_at` (one clock, the API's), so a skew between machines moves
neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


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
