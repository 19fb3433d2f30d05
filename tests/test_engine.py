"""The engine against the tiny model: parity with stock KolorsPipeline, seeds, steps, encodings."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    KolorsPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from kolors_api.engine import Engine, GenerationOutput, encode_image
from kolors_api.engine.pipeline import EngineOptions, padded_rows
from kolors_api.schema import SCHEDULERS, GenerateParams

# The documented construction of each scheduler, written out independently of the engine's table.
STOCK_SCHEDULERS: dict[str, Any] = {
    "EulerDiscreteScheduler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
    "EulerAncestralDiscreteScheduler": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg),
    "DPMSolverMultistepScheduler": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg),
    "DPMSolverMultistepScheduler_SDE_karras": lambda cfg: DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
    "UniPCMultistepScheduler": lambda cfg: UniPCMultistepScheduler.from_config(cfg),
    "DEISMultistepScheduler": lambda cfg: DEISMultistepScheduler.from_config(cfg),
}
MAGIC = {"webp": (b"RIFF", b"WEBP"), "jpg": (b"\xff\xd8\xff", b""), "png": (b"\x89PNG\r\n\x1a\n", b"")}
PIL_FORMAT = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def stock(tiny_model: Path) -> KolorsPipeline:
    """The stock pipeline, loaded on its own (shares nothing with the engine)."""
    return KolorsPipeline.from_pretrained(str(tiny_model))


def params(**kw: Any) -> GenerateParams:
    base: dict[str, Any] = dict(prompt="a red fox in the snow", negative_prompt="blurry", cfg=6.0, seed=1234,
                                steps=3, width=64, height=64, output_format="png")
    return GenerateParams(**{**base, **kw})


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_parity_with_stock_pipeline(engine: Engine, stock: KolorsPipeline, scheduler: str) -> None:
    p = params(scheduler=scheduler, number_of_images=2, width=128, height=64, seed=99, cfg=4.5)
    ours = engine.generate(p)

    fresh = STOCK_SCHEDULERS[scheduler](stock.scheduler.config)
    pipe = KolorsPipeline(**{**stock.components, "scheduler": fresh})
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=p.prompt, negative_prompt=p.negative_prompt, guidance_scale=p.cfg,
        num_inference_steps=p.steps, width=p.width, height=p.height, num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (99, 100)], output_type="np",
    ).images
    expected = (theirs * 255).round().astype("uint8")  # diffusers' own numpy -> PIL conversion
    assert len(ours.images) == 2
    for i in range(2):
        np.testing.assert_array_equal(pixels(ours.images[i]), expected[i])
    # The engine never touches the loaded pipeline's scheduler.
    assert type(engine.pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_output_fields(engine: Engine) -> None:
    out = engine.generate(params(output_format="webp", seed=5, number_of_images=2))
    assert isinstance(out, GenerationOutput)
    assert out.seeds == [5, 6]
    assert out.content_type == "image/webp"
    assert out.inference_time > 0
    assert engine.device == "cpu" and engine.dtype_name == "float32"


def test_same_params_same_bytes(engine: Engine) -> None:
    p = params(output_format="webp", scheduler="EulerAncestralDiscreteScheduler")
    assert engine.generate(p).images == engine.generate(p).images


def test_different_seed_different_image(engine: Engine) -> None:
    a = pixels(engine.generate(params(seed=1)).images[0]).astype(int)
    b = pixels(engine.generate(params(seed=2)).images[0]).astype(int)
    assert np.abs(a - b).mean() > 5


def test_prompt_conditions_the_image(engine: Engine) -> None:
    a = pixels(engine.generate(params(prompt="a cat")).images[0]).astype(int)
    b = pixels(engine.generate(params(prompt="a dog")).images[0]).astype(int)
    assert np.abs(a - b).mean() > 0.5


def test_text_encoder_sees_at_most_256_tokens(engine: Engine) -> None:
    long = "cat " * 400
    a = engine.generate(params(prompt=long + "in the snow")).images
    b = engine.generate(params(prompt=long + "on the beach")).images
    assert a == b  # the difference lies past the 256th token


def test_image_i_uses_seed_plus_i(engine: Engine) -> None:
    sde = "DPMSolverMultistepScheduler_SDE_karras"  # a stochastic sampler: generators matter at every step
    batch = engine.generate(params(seed=41, number_of_images=3, scheduler=sde))
    assert batch.seeds == [41, 42, 43]
    images = [pixels(b).astype(int) for b in batch.images]
    singles = [pixels(engine.generate(params(seed=s, scheduler=sde)).images[0]).astype(int)
               for s in (41, 42, 43)]
    for i in range(3):
        for j in range(3):
            diff = np.abs(images[i] - singles[j])
            if i == j:
                # Same noise, same image; a batch of 3 runs other CPU kernels than a batch of 1,
                # so a rare pixel may round the other way.
                assert diff.max() <= 2 and diff.mean() < 0.01
            else:
                assert diff.mean() > 5
    # seed + i wraps at 2^32
    assert engine.generate(params(seed=2**32 - 1, number_of_images=2)).seeds == [2**32 - 1, 0]


def test_decoding_one_by_one_matches_the_batch(engine: Engine) -> None:
    # The GPU path (bounded VAE memory) decodes image by image; on CPU the engine decodes the batch.
    p = params(number_of_images=3, width=128, height=64)
    batched = [pixels(b).astype(int) for b in engine.generate(p).images]
    engine.decode_one_by_one = True
    try:
        singly = [pixels(b).astype(int) for b in engine.generate(p).images]
    finally:
        engine.decode_one_by_one = False
    for a, b in zip(batched, singly, strict=True):
        assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.01


def test_on_step_reports_every_step(engine: Engine) -> None:
    for scheduler in ("EulerDiscreteScheduler", "UniPCMultistepScheduler"):
        calls: list[tuple[int, int]] = []
        engine.generate(params(steps=4, scheduler=scheduler), on_step=lambda s, t, preview: calls.append((s, t)))
        assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_on_step_exception_aborts_and_propagates(engine: Engine) -> None:
    class Cancelled(Exception):
        pass

    calls: list[int] = []

    def cancel_at_2(step: int, total: int, preview: object = None) -> None:
        calls.append(step)
        if step == 2:
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        engine.generate(params(steps=5), on_step=cancel_at_2)
    assert calls == [1, 2]
    # The engine is unharmed: the next run gives what a fresh run gives.
    assert engine.generate(params(steps=5)).images == engine.generate(params(steps=5)).images


@pytest.mark.parametrize("fmt", ["webp", "jpg", "png"])
def test_output_formats(engine: Engine, fmt: str) -> None:
    out = engine.generate(params(output_format=fmt, width=128, height=64))
    data = out.images[0]
    head, tag = MAGIC[fmt]
    assert data.startswith(head) and (not tag or data[8:12] == tag)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == PIL_FORMAT[fmt]
        assert img.size == (128, 64)
        assert img.mode == "RGB"
    assert out.content_type == {"webp": "image/webp", "jpg": "image/jpeg", "png": "image/png"}[fmt]


def test_sizes_that_are_not_multiples_of_64(engine: Engine) -> None:
    out = engine.generate(params(width=72, height=136))
    assert pixels(out.images[0]).shape == (136, 72, 3)


def test_quality(engine: Engine) -> None:
    low = engine.generate(params(output_format="jpg", output_quality=10, width=128, height=128)).images[0]
    high = engine.generate(params(output_format="jpg", output_quality=95, width=128, height=128)).images[0]
    assert low != high and len(low) < len(high)
    low = engine.generate(params(output_format="webp", output_quality=10, width=128, height=128)).images[0]
    high = engine.generate(params(output_format="webp", output_quality=95, width=128, height=128)).images[0]
    assert low != high and len(low) < len(high)
    # png is lossless: quality does not matter
    a = engine.generate(params(output_format="png", output_quality=10)).images[0]
    b = engine.generate(params(output_format="png", output_quality=95)).images[0]
    assert a == b


def test_encode_image_is_deterministic_and_lossless_for_png() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    for fmt in ("webp", "jpg", "png"):
        assert encode_image(image, fmt, 80) == encode_image(image.copy(), fmt, 80)
    np.testing.assert_array_equal(pixels(encode_image(image, "png", 0)), np.asarray(image))
    with pytest.raises(ValueError):
        encode_image(image, "gif", 80)


def test_make_scheduler_is_fresh_each_call(engine: Engine) -> None:
    for name in SCHEDULERS:
        a, b = engine.make_scheduler(name), engine.make_scheduler(name)
        assert a is not b and a is not engine.pipe.scheduler
        assert a.config.num_train_timesteps == 1100 and a.config.beta_end == 0.014
    sde = engine.make_scheduler("DPMSolverMultistepScheduler_SDE_karras")
    assert type(sde) is DPMSolverMultistepScheduler
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.use_karras_sigmas
    with pytest.raises(ValueError, match="scheduler"):
        engine.make_scheduler("PNDMScheduler")


def test_concurrent_calls_do_not_share_state(engine: Engine) -> None:
    jobs = [params(scheduler=s, seed=i, steps=3) for i, s in enumerate(SCHEDULERS)]
    expected = [engine.generate(p).images for p in jobs]
    results: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = engine.generate(jobs[i]).images
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(jobs))] == expected


def test_engine_resolves_tiny_under_data_dir(tmp_path: Path) -> None:
    engine = Engine("tiny", data_dir=tmp_path, device="cpu")
    assert engine.model == "tiny"
    assert Path(engine.path) == tmp_path / "models" / "tiny"
    out = engine.generate(params())
    assert len(out.images) == 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_job_in_a_batch_makes_the_images_of_its_own_run(engine: Engine, scheduler: str) -> None:
    """Jobs of one shape in one call (the worker's batching): each job's image i is the image a run of
    its own gives for seed+i, for every scheduler, the stochastic ones too (its own generators).
    Compared as PNG: a lossy format would magnify the batched kernels' last-bit differences."""
    jobs = [params(scheduler=scheduler, seed=7, number_of_images=2),
            params(scheduler=scheduler, seed=500, prompt="a lighthouse at dusk", negative_prompt=""),
            params(scheduler=scheduler, seed=7, prompt="a green apple")]
    outs = engine.generate_batch([(job, None) for job in jobs])
    for job, out in zip(jobs, outs, strict=True):
        assert isinstance(out, GenerationOutput) and out.seeds == job.seeds
        alone = engine.generate(job)
        assert len(out.images) == len(alone.images) == job.number_of_images
        for ours, theirs in zip(out.images, alone.images, strict=True):
            diff = np.abs(pixels(ours).astype(int) - pixels(theirs).astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.01
    # and the jobs are not the same image: prompts and seeds count per job
    first, third = (pixels(outs[n].images[0]).astype(int) for n in (0, 2))  # type: ignore[union-attr]
    assert np.abs(first - third).mean() > 0.5


def test_a_job_whose_step_callback_raises_is_dropped_alone(engine: Engine) -> None:
    class Stop(Exception):
        pass

    steps: list[int] = []

    def stop_at_2(step: int, total: int, preview: Any = None) -> None:
        if step == 2:
            raise Stop("cancelled")

    previews: list[bytes] = []

    def count(step: int, total: int, preview: Any = None) -> None:
        steps.append(step)
        previews.append(preview())

    jobs = [params(seed=1, steps=4), params(seed=2, steps=4)]
    a, b = engine.generate_batch([(jobs[0], stop_at_2), (jobs[1], count)])
    assert isinstance(a, Stop) and isinstance(b, GenerationOutput)
    assert steps == [1, 2, 3, 4]  # the other job ran to its end
    # its previews are of its own first image: those of a run of its own
    alone_previews: list[bytes] = []
    engine.generate(jobs[1], lambda step, total, preview: alone_previews.append(preview()))
    for ours, theirs in zip(previews, alone_previews, strict=True):
        assert np.abs(pixels(ours).astype(int) - pixels(theirs).astype(int)).mean() < 1
    alone = pixels(engine.generate(jobs[1]).images[0]).astype(int)
    assert np.abs(pixels(b.images[0]).astype(int) - alone).max() <= 1
    # when every job is dropped, the call stops at once
    seen: list[int] = []

    def stop_both(step: int, total: int, preview: Any = None) -> None:
        seen.append(step)
        raise Stop("lease lost")

    outs = engine.generate_batch([(jobs[0], stop_both), (jobs[1], stop_both)])
    assert all(isinstance(o, Stop) for o in outs) and seen == [1, 1]
    with pytest.raises(ValueError, match="different shapes"):
        engine.generate_batch([(jobs[0], None), (params(width=128), None)])


def test_a_padded_call_runs_the_next_row_count_and_drops_the_padding(tiny_model: Path, engine: Engine) -> None:
    """`pad_batches` (on with `--compile`): a call of 3 images runs 4 rows, so that a compiled UNet
    only ever sees the row counts compiled at start; the padding is dropped and every job's images
    are those of an unpadded call."""
    assert [padded_rows(n) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 17]
    padded = Engine(str(tiny_model), device="cpu", options=EngineOptions(pad_batches=True))
    rows: list[int] = []
    make = padded._call_pipeline

    def counting(scheduler: Any) -> Any:
        pipe = make(scheduler)
        call = pipe.__call__

        class Counted:
            def __getattr__(self, name: str) -> Any:
                return getattr(pipe, name)

            def __call__(self, **kw: Any) -> Any:
                rows.append(len(kw["generator"]))
                return call(**kw)
        return Counted()

    padded._call_pipeline = counting  # type: ignore[method-assign]
    jobs = [params(seed=3, number_of_images=2), params(seed=9, prompt="a green apple")]
    outs = padded.generate_batch([(job, None) for job in jobs])
    plain = engine.generate_batch([(job, None) for job in jobs])
    assert rows == [4]
    assert [len(o.images) for o in outs if isinstance(o, GenerationOutput)] == [2, 1]
    for ours, theirs in zip(outs, plain, strict=True):
        assert isinstance(ours, GenerationOutput) and isinstance(theirs, GenerationOutput)
        assert ours.seeds == theirs.seeds
        for a, b in zip(ours.images, theirs.images, strict=True):
            diff = np.abs(pixels(a).astype(int) - pixels(b).astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.01
    # a full row count runs as it is
    rows.clear()
    padded.generate_batch([(params(seed=1, number_of_images=2), None), (params(seed=5, number_of_images=2), None)])
    assert rows == [4]
