"""Which queued jobs may share one pipeline call with a claimed one, written once for every store.

Jobs share a call when they have the same `SHAPE_FIELDS` (width, height, steps, scheduler, cfg, and for
pictures in the strength of image to image and the IP-Adapter's scale, None where a job has none: a
text-to-image job never shares a call with an image-to-image one, nor a job with a reference with one
without, nor two references of different scales):
prompts, negative prompts, seeds, number_of_images and output formats may differ. A batch is
bounded by `BatchLimits`: images per call (each job's number_of_images counts) and images × pixels
per call. The claimed job (the head of the queue) is always taken, even alone over the pixel
budget; the others are the oldest queued compatible jobs that still fit, looked for among the
`window` oldest queued jobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
