"""The engine's options on CPU: random-weight pipelines (`random:small`, `random:full`), dtype, VAE,
tiled decode, the prompt-embedding cache, compile shapes.

The full-size model is checked on the `meta` device (its shapes and parameter counts, no memory);
its weights are drawn only on a GPU (`bench/gpu.sh`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_api.engine import Engine, EngineOptions, prompt_cache
from kolors_api.engine.pipeline import resolve_dtype
from kolors_api.engine.random_weights import (
    FULL_UNET,
    _materialize,
    build_random_pipeline,
    full_modules,
    parameter_counts,
)
from kolors_api.schema import GenerateParams
from kolors_api.settings import Settings, compile_shapes, random_model_size
from tests.conftest import redis_db_url

PARAMS = GenerateParams(prompt="a red fox in the snow", steps=3, width=256, height=256, seed=7, number_of_images=2)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model) -> Engine:  # type: ignore[no-untyped-def]
    return Engine(str(tiny_model), device="cpu")


def test_full_size_has_the_published_shapes() -> None:
    modules = full_modules()
    counts = parameter_counts(modules)
    # Kwai-Kolors/Kolors-diffusers: UNet ≈2.6 B, ChatGLM3-6B ≈6.2 B, SDXL's VAE 83.7 M.
    assert 2.55e9 < counts["unet"] < 2.6e9
    assert 6.2e9 < counts["text_encoder"] < 6.3e9
    assert 83.5e6 < counts["vae"] < 83.8e6
    unet, glm = modules["unet"], modules["text_encoder"]
    assert all(p.is_meta for p in unet.parameters())  # nothing was allocated
    assert [len(b.attentions[0].transformer_blocks) for b in unet.down_blocks[1:]] == [2, 10]
    assert unet.config.projection_class_embeddings_input_dim == 6 * FULL_UNET["addition_time_embed_dim"] + 4096
    assert (glm.num_layers, glm.encoder.layers[0].self_attention.hidden_size_per_attention_head) == (28, 128)
    assert glm.config.padded_vocab_size == 65024


def test_materialize_draws_every_parameter_on_the_device() -> None:
    glm = full_modules()["text_encoder"].encoder.layers[0]  # one ChatGLM3 layer: 200 M parameters
    _materialize(glm, torch.device("cpu"), torch.bfloat16, torch.Generator().manual_seed(0))
    params = dict(glm.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert torch.equal(params["input_layernorm.weight"], torch.ones(4096, dtype=torch.bfloat16))
    assert not params["self_attention.query_key_value.bias"].any()
    weight = params["mlp.dense_h_to_4h.weight"].float()
    assert abs(weight.std().item() - 4096**-0.5) < 1e-3  # N(0, 1/fan_in)


def test_random_small_is_the_tiny_model_without_files(tiny_engine: Engine) -> None:
    from_files = tiny_engine.generate(PARAMS)
    in_memory = Engine("random:small", device="cpu").generate(PARAMS)
    assert in_memory.images == from_files.images
    image = pixels(in_memory.images[0])
    assert image.std() > 1  # not a constant image
    assert in_memory.peak_memory_bytes is None  # CPU: no accelerator peak to report


def test_random_model_names() -> None:
    assert [random_model_size(name) for name in ("random:small", "random:full", "tiny", "random")] == [
        "small", "full", None, None]
    with pytest.raises(ValueError, match="random:small, random:full"):
        random_model_size("random:huge")
    with pytest.raises(ValueError, match="random model size"):
        build_random_pipeline("huge", device="cpu", dtype=torch.float32)


def test_bfloat16_runs_and_stays_close(tiny_engine: Engine) -> None:
    engine = Engine("random:small", device="cpu", options=EngineOptions(dtype="bfloat16"))
    assert (engine.dtype_name, engine.pipe.unet.dtype) == ("bfloat16", torch.bfloat16)
    out = engine.generate(PARAMS)
    reference = tiny_engine.generate(PARAMS)
    assert len(out.images) == 2
    # bf16 keeps 8 bits of mantissa: the same picture, not the same bytes.
    assert np.abs(pixels(out.images[0]) - pixels(reference.images[0])).mean() < 16
    assert resolve_dtype("auto", on_cuda=True) == torch.float16
    with pytest.raises(ValueError, match="expected auto or one of"):
        resolve_dtype("float8", on_cuda=False)


def test_vae_option_loads_a_vae_folder(tiny_model, tiny_engine: Engine) -> None:  # type: ignore[no-untyped-def]
    # The tiny model's own VAE, given by its pipeline folder (the `vae` subfolder) and by the folder itself.
    for path in (tiny_model, tiny_model / "vae"):
        engine = Engine(str(tiny_model), device="cpu", options=EngineOptions(vae=str(path)))
        assert engine.pipe.vae is not tiny_engine.pipe.vae
        assert engine.generate(PARAMS).images == tiny_engine.generate(PARAMS).images


def test_large_images_decode_in_tiles(tiny_engine: Engine) -> None:
    params = GenerateParams(prompt="a wide valley", steps=1, width=2048, height=1536, seed=1)
    image = pixels(tiny_engine.generate(params).images[0])
    assert image.shape == (1536, 2048, 3)
    assert image.std() > 1


def test_compile_shapes_setting() -> None:
    assert compile_shapes("1024x1024, 768X1344,") == ((1024, 1024), (768, 1344))
    assert compile_shapes("") == ()
    for bad in ("1024", "1024x", "１０２４x1024", "1000x7", "4096x4096", "²x²", "9" * 50 + "x8"):
        with pytest.raises(ValueError):
            Settings(compile_shapes=bad)
    settings = Settings(dtype="bfloat16", compile=True, compile_shapes="512x768", offload=True)
    assert (settings.dtype, settings.compile, settings.offload) == ("bfloat16", True, True)


def test_cli_engine_flags_and_random_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = [sys.executable, "-m", "kolors_api.cli"]
    fleet = ["--store", redis_db_url(15)]  # a worker refuses the embedded store before anything else
    bad = subprocess.run([*run, "worker", *fleet, "--compile-shapes", "1000x7", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "compile_shapes (flag --compile-shapes, env KOLORS_API_COMPILE_SHAPES)" in bad.stderr
    assert "multiple of 8" in bad.stderr and "Traceback" not in bad.stderr
    unknown = subprocess.run([*run, "worker", *fleet, "--model", "random:huge", "--data-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "the random models are random:small, random:full" in unknown.stderr
    made = subprocess.run([*run, "random-model", "--size", "small", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["model"] == "random:small" and report["dtype"] == "float32"
    assert report["total_parameters"] == sum(report["parameters"].values()) > 400_000


def test_prompt_cache_hits_and_bounds(tiny_engine: Engine) -> None:
    cache = tiny_engine.prompts
    params = GenerateParams(prompt="a cached lighthouse", steps=2, width=256, height=256, seed=3)
    before = dict(prompt_cache.STATS)
    first = tiny_engine.generate(params)
    assert tiny_engine.generate(params).images == first.images  # the cached embeddings: the same bytes
    assert len(tiny_engine.generate(dataclasses.replace(params, number_of_images=2)).images) == 2
    assert prompt_cache.STATS["misses"] - before["misses"] == 1
    assert prompt_cache.STATS["hits"] - before["hits"] == 2
    tiny_engine.generate(dataclasses.replace(params, cfg=1.0))  # no guidance: another entry, no negative
    entry = cache._entries[(params.prompt, None, 256)]
    assert entry.negative is None and entry.prompt.shape[0] == 1
    one = entry.nbytes
    small = prompt_cache.PromptCache(max_bytes=2 * one)
    for i in range(5):
        small.encode(tiny_engine.pipe, f"prompt {i}", None, device="cpu", max_sequence_length=256)
        assert small.bytes <= 2 * one
    assert [key[0] for key in small._entries] == ["prompt 3", "prompt 4"]  # least recently used out
    off = prompt_cache.PromptCache(max_bytes=0)
    off.encode(tiny_engine.pipe, "x", "", device="cpu", max_sequence_length=256)
    assert len(off) == 0
