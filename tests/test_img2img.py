"""Image to image in the engine (tiny model): parity with stock KolorsImg2ImgPipeline, seeds, batching."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import KolorsImg2ImgPipeline
from PIL import Image

from kolors_api.engine import Engine, build_tiny_model
from kolors_api.engine.pipeline import GenerationOutput
from kolors_api.images import fit, open_image
from kolors_api.jobs.batching import BatchBuilder, BatchLimits
from kolors_api.schema import GenerateParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gradient_png(width: int = 96, height: int = 80, seed: int = 0) -> bytes:
    """A deterministic picture with structure (not noise), as PNG bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)
    rgb[rng.integers(0, height, 20), rng.integers(0, width, 20)] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def with_picture(data: bytes, **kw: Any) -> GenerateParams:
    sha = hashlib.sha256(data).hexdigest()
    base: dict[str, Any] = dict(prompt="a red fox in the snow", negative_prompt="blurry", cfg=5.0, seed=42,
                                steps=4, width=64, height=64, output_format="png", strength=0.75)
    return GenerateParams(**{**base, **kw, "image": sha}, inputs={sha: data})


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("img2img") / "tiny")


@pytest.fixture(scope="module")
def engine(tiny: Path) -> Engine:
    return Engine(str(tiny), device="cpu")


def test_parity_with_stock_img2img_pipeline(engine: Engine, tiny: Path) -> None:
    data = gradient_png(96, 80)
    p = with_picture(data, width=64, height=64, seed=7, number_of_images=2, strength=0.5, steps=6)
    ours = engine.generate(p)
    stock = KolorsImg2ImgPipeline.from_pretrained(str(tiny))
    stock.set_progress_bar_config(disable=True)
    theirs = stock(
        prompt=p.prompt, negative_prompt=p.negative_prompt, image=fit(open_image(data), 64, 64), strength=0.5,
        guidance_scale=p.cfg, num_inference_steps=6, num_images_per_prompt=2, width=64, height=64,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (7, 8)], output_type="np",
    ).images
    expected = (theirs * 255).round().astype(int)
    assert len(ours.images) == 2
    for i in range(2):
        got = pixels(ours.images[i])
        assert got.shape == (64, 64, 3)
        assert np.abs(got - expected[i]).max() <= 1  # within 1/255


def test_output_takes_the_requested_size_not_the_inputs(engine: Engine) -> None:
    out = engine.generate(with_picture(gradient_png(200, 90), width=96, height=64, steps=2, strength=1.0))
    assert Image.open(io.BytesIO(out.images[0])).size == (96, 64)


def test_same_seed_and_inputs_same_bytes(engine: Engine) -> None:
    p = with_picture(gradient_png(), output_format="webp", scheduler="EulerAncestralDiscreteScheduler")
    assert engine.generate(p).images == engine.generate(p).images


def test_the_picture_steers_the_output(engine: Engine) -> None:
    a = pixels(engine.generate(with_picture(gradient_png(seed=1), strength=0.3)).images[0])
    inverted = io.BytesIO()
    Image.fromarray(255 - np.asarray(Image.open(io.BytesIO(gradient_png(seed=1))))).save(inverted, "PNG")
    c = pixels(engine.generate(with_picture(inverted.getvalue(), strength=0.3)).images[0])
    assert np.abs(a - c).mean() > 5  # same seed and prompt, another picture: another output


def test_progress_counts_the_steps_run(engine: Engine) -> None:
    seen: list[tuple[int, int]] = []
    engine.generate(with_picture(gradient_png(), steps=8, strength=0.5), lambda s, t, _p=None: seen.append((s, t)))
    assert seen == [(i, 4) for i in range(1, 5)]


def test_a_batch_gives_each_job_the_bytes_of_its_own_run(engine: Engine) -> None:
    a = with_picture(gradient_png(seed=1), seed=1)
    b = with_picture(gradient_png(seed=2), seed=2, number_of_images=2, prompt="a blue car")
    together = engine.generate_batch([(a, None), (b, None)])
    alone = [engine.generate(a), engine.generate(b)]
    for got, single in zip(together, alone, strict=True):
        assert isinstance(got, GenerationOutput)
        for x, y in zip(got.images, single.images, strict=True):
            assert np.abs(pixels(x) - pixels(y)).max() <= 1


def test_batches_group_only_same_strength_and_scale() -> None:
    base = with_picture(b"x").to_dict()
    batch = BatchBuilder(BatchLimits(max_images=8), base)
    assert batch.fits(base)
    assert not batch.fits({**base, "strength": 0.5})
    text = {k: v for k, v in base.items() if k not in ("image", "strength")}
    assert not batch.fits(text)  # text to image never joins image to image
    ip = {**base, "ip_adapter_image": "f" * 64, "ip_adapter_scale": 0.5}
    assert not batch.fits(ip)
    ip_batch = BatchBuilder(BatchLimits(max_images=8), ip)
    assert ip_batch.fits({**ip, "ip_adapter_image": "e" * 64})  # another reference, same scale
    assert not ip_batch.fits({**ip, "ip_adapter_scale": 0.25})


def test_engine_refuses_a_mixed_batch(engine: Engine) -> None:
    a = with_picture(gradient_png(), strength=0.5)
    b = with_picture(gradient_png(), strength=0.75)
    with pytest.raises(ValueError, match="different shapes"):
        engine.generate_batch([(a, None), (b, None)])


# -- the IP-Adapter (tiny image encoder and IP-Adapter-Plus weights, loaded through `load_ip_adapter`)
@pytest.fixture(scope="module")
def ip_engine(tiny: Path) -> Engine:
    from kolors_api.engine.pipeline import EngineOptions

    return Engine(str(tiny), device="cpu", options=EngineOptions(ip_adapter="tiny"))


def with_reference(data: bytes, scale: float, **kw: Any) -> GenerateParams:
    sha = hashlib.sha256(data).hexdigest()
    base: dict[str, Any] = dict(prompt="a red fox", cfg=5.0, seed=42, steps=3, width=64, height=64,
                                output_format="png")
    return GenerateParams(**{**base, **kw}, ip_adapter_image=sha, ip_adapter_scale=scale, inputs={sha: data})


def test_ip_adapter_loads_through_load_ip_adapter(ip_engine: Engine) -> None:
    assert type(ip_engine.pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert (Path(ip_engine.path) / "ip_adapter" / "ip_adapter_plus_general.safetensors").is_file()


def test_scale_zero_is_exactly_the_plain_bytes_and_a_scale_steers(ip_engine: Engine, engine: Engine) -> None:
    ref = gradient_png(seed=9)
    no_ref = GenerateParams(**{k: v for k, v in with_reference(ref, 0.5).to_dict().items()
                               if not k.startswith("ip_adapter")})
    plain = engine.generate(no_ref)
    assert ip_engine.generate(with_reference(ref, 0.0)).images == plain.images  # scale 0: the plain bytes
    steered = ip_engine.generate(with_reference(ref, 1.0))
    assert np.abs(pixels(steered.images[0]) - pixels(plain.images[0])).mean() > 1
    # and the plain path of the IP engine is the plain engine's, after a call with a reference too
    assert ip_engine.generate(no_ref).images == plain.images


def test_ip_adapter_rows_with_different_references_batch_as_separate_calls(ip_engine: Engine) -> None:
    a = with_reference(gradient_png(seed=1), 0.8, seed=1)
    b = with_reference(gradient_png(seed=2), 0.8, seed=2, number_of_images=2, prompt="a blue car")
    together = ip_engine.generate_batch([(a, None), (b, None)])
    for got, params in zip(together, (a, b), strict=True):
        assert isinstance(got, GenerationOutput)
        for x, y in zip(got.images, ip_engine.generate(params).images, strict=True):
            assert np.abs(pixels(x) - pixels(y)).max() <= 1


def test_img2img_with_a_reference(ip_engine: Engine) -> None:
    ref = gradient_png(seed=3)
    p = with_picture(gradient_png(seed=4))
    sha = hashlib.sha256(ref).hexdigest()
    both = GenerateParams(**{**p.to_dict(), "ip_adapter_image": sha, "ip_adapter_scale": 0.7},
                          inputs={**p.inputs, sha: ref})
    out = ip_engine.generate(both)
    assert out.images != ip_engine.generate(p).images


def test_the_tiny_ip_adapter_builds_byte_identical(tiny: Path, tmp_path: Path) -> None:
    import shutil

    from kolors_api.engine.tiny_ip_adapter import build_tiny_ip_adapter

    copy = tmp_path / "tiny"
    shutil.copytree(tiny, copy, ignore=shutil.ignore_patterns("ip_adapter"))
    a, b = build_tiny_ip_adapter(tiny), build_tiny_ip_adapter(copy)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert Path("ip_adapter_plus_general.safetensors") in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
