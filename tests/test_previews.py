"""Live previews: the latent-to-RGB map, the engine's lazy preview on the tiny model, and the worker's
side of the contract (which steps it previews, what it stores, engines that offer none)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_api.engine import Engine
from kolors_api.engine.previews import LATENT_RGB_BIAS, latents_to_rgb, preview_webp
from kolors_api.jobs import JobState, NewJob
from kolors_api.jobs.sqlite import SQLiteStore
from kolors_api.schema import GenerateParams
from kolors_api.worker.loop import Worker
from kolors_api.worker.previews import PREVIEWS_PER_JOB, preview_every, take_preview

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        return np.asarray(image.convert("RGB"))


def test_the_map_is_linear_with_its_bias_and_survives_non_finite_latents() -> None:
    zero = latents_to_rgb(torch.zeros(4, 2, 3))
    assert zero.shape == (2, 3, 3) and zero.dtype == torch.uint8
    expected = [round((b + 1) * 127.5) for b in LATENT_RGB_BIAS]
    assert np.abs(zero.numpy().astype(int) - expected).max() <= 1
    broken = torch.full((4, 8, 8), float("nan"))
    broken[0, 0, 0] = float("inf")
    assert decode(preview_webp(broken)).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="latents of shape"):
        latents_to_rgb(torch.zeros(1, 4, 8, 8))


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine(str(tiny_model), device="cpu")


def test_the_engine_offers_a_lazy_preview_of_the_first_image_at_an_eighth_of_its_size(engine: Engine) -> None:
    taken: dict[int, np.ndarray] = {}

    def on_step(step: int, total: int, preview: Callable[[], bytes]) -> None:
        if step in (1, 3):
            taken[step] = decode(preview())

    engine.generate(GenerateParams(prompt="a red fox", seed=3, steps=4, width=96, height=64,
                                   number_of_images=2), on_step)

    assert set(taken) == {1, 3}
    for image in taken.values():
        assert image.shape == (8, 12, 3)  # height/8, width/8
        assert np.isfinite(image).all() and image.std() > 0  # a picture, not a flat colour
    assert not np.array_equal(taken[1], taken[3])


def test_the_worker_previews_every_few_steps_but_never_the_last() -> None:
    offered = lambda: b"webp"  # noqa: E731
    for total in (1, 4, 20, 25, 50):
        taken = [s for s in range(1, total + 1) if take_preview(s, total, offered) is not None]
        assert len(taken) <= PREVIEWS_PER_JOB and total not in taken
        assert taken == list(range(preview_every(total), total, preview_every(total)))
    assert take_preview(2, 20, None) is None

    def broken() -> bytes:
        raise RuntimeError("no preview today")

    assert take_preview(3, 20, broken) is None  # logged, the job goes on


class Out:
    def __init__(self, params: GenerateParams) -> None:
        self.images = [b"RIFF0000WEBP"]
        self.seeds = params.seeds
        self.inference_time = 0.0


class TwoArgEngine:
    """A custom engine written before previews: it calls on_step(step, total)."""

    def generate(self, params: GenerateParams, on_step: Any = None) -> Out:
        for step in range(1, params.steps + 1):
            on_step(step, params.steps)
        return Out(params)


class PreviewEngine:
    def generate(self, params: GenerateParams, on_step: Any = None) -> Out:
        for step in range(1, params.steps + 1):
            # a step takes time, as a real one does: the store's answer to the first report (someone
            # watches) is back before the steps that take previews
            time.sleep(0.05)
            on_step(step, params.steps, lambda step=step: f"preview {step}".encode())
        return Out(params)


@pytest.mark.parametrize("engine_class", [TwoArgEngine, PreviewEngine])
@pytest.mark.parametrize("watched", [True, False])
async def test_the_worker_makes_previews_only_while_someone_watches(tmp_path: Path, engine_class: type,
                                                                   watched: bool) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        job = await store.submit(NewJob(model="kolors", params=GenerateParams(prompt="x", steps=9).to_dict()))
        if watched:
            await store.watch_previews(job.id, 60)
        worker = Worker(store, engine_class)
        worker.engine = engine_class()
        lease = await store.claim(worker.id, 30, 1)
        assert lease is not None
        await worker.process(lease)
        done = await store.get(job.id)
        assert done is not None and done.state == JobState.COMPLETED and done.step == 9
        preview = await store.read_preview(job.id)
        if engine_class is TwoArgEngine or not watched:
            assert preview is None
        else:  # every preview_every(9) = 2 steps: the last one taken is step 8
            assert preview == (8, b"preview 8")
    finally:
        await store.close()
