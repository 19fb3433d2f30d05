"""The offline `tiny` model: deterministic, small, complete, loadable through the real loading path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, KolorsPipeline, UNet2DConditionModel
from diffusers.pipelines.kolors import ChatGLMModel
from safetensors.torch import load_file

from kolors_api.engine import build_tiny_model, resolve_model
from kolors_api.engine.tiny import MARKER, TINY_VERSION, is_tiny_model

WEIGHTS = ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
           "vae/diffusion_pytorch_model.safetensors")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="module")
def pipe(tiny: Path) -> KolorsPipeline:
    pipe = KolorsPipeline.from_pretrained(str(tiny))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    first, second = _files(tiny), _files(again)
    assert set(first) == set(second)
    for weights in WEIGHTS:
        assert weights in first
    for name in first:
        assert first[name] == second[name], name


def test_folder_is_small_and_says_what_it_is(tiny: Path) -> None:
    size = sum(len(data) for data in _files(tiny).values())
    assert size < 20 * 1024 * 1024
    assert "noise, not pictures" in (tiny / "README.md").read_text()
    marker = json.loads((tiny / MARKER).read_text())
    assert marker["version"] == TINY_VERSION and marker["random_weights"] is True
    assert is_tiny_model(tiny)


def test_files_are_not_private(tiny: Path) -> None:
    for file in tiny.rglob("*"):
        if file.is_file():
            assert file.stat().st_mode & 0o044 == (tiny / "README.md").stat().st_mode & 0o044, file


def test_every_parameter_and_buffer_is_finite_and_loaded_as_saved(tiny: Path, pipe: KolorsPipeline) -> None:
    for component, weights in zip((pipe.text_encoder, pipe.unet, pipe.vae), WEIGHTS, strict=True):
        saved = load_file(str(tiny / weights))
        state = component.state_dict()
        assert set(state) == set(saved), type(component).__name__
        for name, tensor in state.items():
            assert torch.isfinite(tensor).all(), name
            assert torch.equal(tensor, saved[name]), name
    norms = [p for n, p in pipe.text_encoder.named_parameters() if "layernorm" in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)  # RMSNorm: explicitly 1


def test_components_load_without_missing_or_unexpected_weights(tiny: Path) -> None:
    _, info = ChatGLMModel.from_pretrained(str(tiny / "text_encoder"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(str(tiny), subfolder=sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], sub


def test_architecture_is_shaped_like_kolors(pipe: KolorsPipeline) -> None:
    te, unet, vae = pipe.text_encoder.config, pipe.unet.config, pipe.vae.config
    assert te.original_rope and te.add_qkv_bias and te.multi_query_attention and te.rmsnorm
    assert te.seq_length >= 256
    assert te.padded_vocab_size >= pipe.tokenizer.vocab_size
    assert pipe.vae_scale_factor == 8 and len(vae.block_out_channels) == 4
    assert unet.down_block_types == ["DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.up_block_types == ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]
    assert unet.addition_embed_type == "text_time" and unet.encoder_hid_dim_type == "text_proj"
    assert unet.encoder_hid_dim == te.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te.hidden_size
    sched = pipe.scheduler
    assert type(sched).__name__ == "EulerDiscreteScheduler"
    assert (sched.config.beta_schedule, sched.config.beta_start, sched.config.beta_end) == (
        "scaled_linear", 0.00085, 0.014)
    assert sched.config.num_train_timesteps == 1100 and sched.config.steps_offset == 1
    assert sched.config.timestep_spacing == "leading" and sched.config.prediction_type == "epsilon"


def test_tokenizer_covers_any_text_with_byte_fallback(pipe: KolorsPipeline) -> None:
    tok = pipe.tokenizer
    assert tok.tokenizer.sp_model.vocab_size() >= 301
    ids = tok("一只可爱的猫 🐱, a photo of a cat")["input_ids"]
    unk = tok.tokenizer.sp_model.unk_id()
    assert unk not in ids
    assert ids[:2] == [tok.get_command("[gMASK]"), tok.get_command("sop")]
    assert max(ids) < pipe.text_encoder.config.padded_vocab_size


def test_generates_finite_varied_noise_that_depends_on_the_prompt(pipe: KolorsPipeline) -> None:
    def run(prompt: str) -> np.ndarray:
        out = pipe(prompt, num_inference_steps=3, width=64, height=64, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(0), output_type="np")
        return out.images[0]

    cat = run("a photo of a cat")
    assert cat.shape == (64, 64, 3)
    assert np.isfinite(cat).all()
    assert cat.std() > 0.05
    assert np.abs(cat - run("a photo of a dog")).mean() > 0.01


def test_resolve_model_builds_once_and_reuses(tmp_path: Path) -> None:
    path = Path(resolve_model("tiny", tmp_path))
    assert path == tmp_path / "models" / "tiny"
    assert is_tiny_model(path)
    mtimes = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    assert resolve_model("tiny", tmp_path) == str(path)
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == mtimes
    assert not [p for p in (tmp_path / "models").iterdir() if p.name != "tiny"]  # no scratch left


def test_building_leaves_the_global_torch_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_model(tmp_path / "tiny")
    assert torch.equal(torch.rand(3), expected)


def test_resolve_model_rebuilds_a_stale_build(tmp_path: Path) -> None:
    stale = tmp_path / "models" / "tiny"
    stale.mkdir(parents=True)
    (stale / MARKER).write_text(json.dumps({"version": -1}))
    assert resolve_model("tiny", tmp_path) == str(stale)
    assert is_tiny_model(stale)


def test_resolve_model_passes_other_names_through(tmp_path: Path) -> None:
    assert resolve_model("Kwai-Kolors/Kolors-diffusers", tmp_path) == "Kwai-Kolors/Kolors-diffusers"
    assert resolve_model("/some/local/folder", tmp_path) == "/some/local/folder"
    assert not (tmp_path / "models").exists()


def test_build_refuses_to_clobber_a_folder(tiny: Path, tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_model(target)
    assert (target / "keep.txt").read_text() == "mine"
    build_tiny_model(target, overwrite=True)
    assert not (target / "keep.txt").exists() and _files(target) == _files(tiny)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_tiny_model(empty) == empty and is_tiny_model(empty)
    assert sorted(os.listdir(tmp_path)) == ["busy", "empty"]
