"""The offline `tiny` model: a small random-weight Kolors pipeline built here, deterministically.

It has the real model's shape where that sets the cost or exercises the code paths (a ChatGLM text
encoder with its sentencepiece tokenizer, an SDXL-style UNet conditioned through `text_proj` and
`text_time`, an 8x VAE, Kolors' scheduler config) and tiny channel counts everywhere. It is saved
with `save_pretrained` in diffusers format and loaded back through `KolorsPipeline.from_pretrained`,
the same path as the real weights. It makes noise, not pictures.

Determinism: every parameter and buffer is written explicitly from numpy's PCG64 generator
(platform-independent), the tokenizer is trained single-threaded on a fixed corpus, so two builds
give byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kolors_api.engine._util import import_untyped, init_rule, quiet_progress_bars

TINY_NAME = "tiny"  # the `--model` name that `pipeline.resolve_model` maps here
# Bump when the architecture or the weights change: cached builds with another version are rebuilt.
TINY_VERSION = 1
MARKER = "kolors-api-tiny.json"

SEED = 0
SP_VOCAB_SIZE = 384
TEXT_HIDDEN = 32

README = """\
# kolors-api `tiny` model

A random-weight test model with the architecture of Kolors (ChatGLM text encoder and its
sentencepiece tokenizer, SDXL-style UNet, 8x VAE, Kolors' scheduler) and tiny channel counts,
built offline and deterministically by `kolors-api tiny-model PATH` (or on first use of
`--model tiny`). It loads through `KolorsPipeline.from_pretrained` like the real weights.

**It makes noise, not pictures.** It exists so that the server, the worker and the tests run
anywhere, quickly, without downloading the real weights. Use `--model Kwai-Kolors/Kolors-diffusers`
(or a local copy of it) for real images.
"""

# A small built-in English corpus for the tokenizer (prompts of the kind the API sees).
CORPUS = """\
A photo of a ladybug, macro, zoom, high quality, film, holding a wooden sign with the text KOLORS.
A cinematic portrait of an old fisherman with a grey beard, golden hour, shallow depth of field.
An astronaut riding a horse on the moon, digital art, highly detailed, trending on artstation.
A watercolor painting of a quiet harbour at dawn, soft pastel colors, boats and seagulls.
A red fox sitting in the snow under a pine tree, winter morning, wildlife photography.
A bowl of ramen with a soft boiled egg, steam rising, studio lighting, food photography.
A futuristic city skyline at night with neon lights reflected in the rain on the street.
A cute corgi puppy wearing sunglasses on a beach, summer, bright and colorful.
An oil painting of a sunflower field under a stormy sky, thick brush strokes, impressionism.
A cozy reading nook with a window, warm lamp light, books stacked on a wooden table.
A mountain lake surrounded by autumn forest, mirror reflection, crisp clear air, landscape.
A minimalist logo of a hummingbird, flat vector design, white background, simple shapes.
A close up of a dew drop on a green leaf, morning light, extreme detail, bokeh.
A medieval castle on a cliff above the sea, dramatic clouds, fantasy concept art.
A street market in the old town, people walking, fruit stalls, vivid colors, documentary photo.
A black and white photograph of a jazz musician playing the saxophone in a smoky club.
An isometric illustration of a tiny island with a lighthouse, palm trees and a small house.
A still life of apples, pears and grapes on a linen cloth, classical painting, soft shadows.
A robot gardener watering flowers in a greenhouse, friendly, pixar style, 3d render.
A hot air balloon festival over green hills at sunrise, many balloons, wide angle photo.
A portrait of a young woman with freckles and red hair, natural light, film grain, 35mm.
A snowy village at night with glowing windows, christmas lights, calm and peaceful mood.
A dragon made of crystal flying over a desert, sparkling light, epic scale, matte painting.
An underwater scene with a coral reef, tropical fish, sun rays from the surface, vibrant.
A vintage car parked in front of a diner, retro style, chrome details, blue sky.
A bamboo forest path with soft mist, quiet, serene, traditional Chinese ink painting.
A bouquet of roses and tulips in a glass vase, white wall, gentle window light, elegant.
A tabby cat sleeping on a windowsill in the afternoon sun, warm tones, detailed fur.
A spaceship landing on an alien planet with two moons, purple sky, science fiction.
A child flying a kite on a windy beach, clouds, joyful, candid photography, wide shot.
Blurry, low quality, deformed hands, extra fingers, watermark, text, jpeg artifacts, ugly.
Worst quality, low resolution, bad anatomy, cropped, out of frame, duplicate, noisy, grainy.
"""


def _train_tokenizer() -> bytes:
    """A byte-fallback BPE sentencepiece model trained on CORPUS, as serialized bytes."""
    import sentencepiece as spm

    spm.set_random_generator_seed(SEED)
    buf = io.BytesIO()
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=SP_VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    return buf.getvalue()


def _normal(shape: tuple[int, ...], rng: np.random.Generator, std: float) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * np.float32(std))


def _init_parameters(model: torch.nn.Module, seed: int) -> None:
    """Write every parameter explicitly (`init_rule`), in a fixed order, from numpy's generator."""
    rng = np.random.default_rng(seed)
    for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
        for name, param in sorted(module.named_parameters(recurse=False), key=lambda item: item[0]):
            constant, std = init_rule(module, name, param)
            with torch.no_grad():
                if constant is not None:
                    param.fill_(constant)
                else:
                    param.copy_(_normal(tuple(param.shape), rng, std))


def _tokenizer(folder: Path) -> Any:
    vocab = folder / "tokenizer.model"
    vocab.write_bytes(_train_tokenizer())
    return import_untyped("diffusers.pipelines.kolors.tokenizer").ChatGLMTokenizer(vocab_file=str(vocab))


def _text_encoder(vocab_size: int) -> Any:
    glm = import_untyped("diffusers.pipelines.kolors.text_encoder")

    padded = -(-(vocab_size + 9) // 64) * 64  # the tokenizer adds 9 special ids after the sp vocab
    config = glm.ChatGLMConfig(
        num_layers=2,
        padded_vocab_size=padded,
        hidden_size=TEXT_HIDDEN,
        ffn_hidden_size=64,
        kv_channels=16,
        num_attention_heads=2,
        seq_length=256,
        multi_query_attention=True,
        multi_query_group_num=1,
        add_qkv_bias=True,
        add_bias_linear=False,
        original_rope=True,
        rmsnorm=True,
        post_layer_norm=True,
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        fp32_residual_connection=False,
        layernorm_epsilon=1e-5,
        use_cache=True,
    )
    model = glm.ChatGLMModel(config, empty_init=False)
    _init_parameters(model, SEED + 1)
    # The one buffer: rotary inverse frequencies, recomputed from their definition.
    rotary = model.rotary_pos_emb
    dim = rotary.dim
    with torch.no_grad():
        rotary.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    return model.eval()


def _unet() -> Any:
    time_dim = 8
    model = import_untyped("diffusers").UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=2,
        transformer_layers_per_block=1,
        cross_attention_dim=32,
        use_linear_projection=True,
        encoder_hid_dim_type="text_proj",
        encoder_hid_dim=TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN,
    )
    _init_parameters(model, SEED + 2)
    return model.eval()


def _vae() -> Any:
    model = import_untyped("diffusers").AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
        mid_block_add_attention=True,
    )
    _init_parameters(model, SEED + 3)
    return model.eval()


def _scheduler() -> Any:
    # Kolors' own scheduler config (Kwai-Kolors/Kolors-diffusers, scheduler/scheduler_config.json).
    return import_untyped("diffusers").EulerDiscreteScheduler(
        num_train_timesteps=1100,
        beta_start=0.00085,
        beta_end=0.014,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def components(scratch: Path) -> dict[str, Any]:
    """The tiny pipeline's components (`KolorsPipeline(**components(...))`), on the CPU in fp32,
    from torch's global RNG seeded here; the tokenizer is trained into `scratch`."""
    torch.manual_seed(SEED)
    tokenizer = _tokenizer(scratch)
    return {
        "vae": _vae(),
        "text_encoder": _text_encoder(tokenizer.vocab_size),
        "tokenizer": tokenizer,
        "unet": _unet(),
        "scheduler": _scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _build_into(folder: Path) -> None:
    # Constructors draw their default init from torch's global RNG (then overwritten): seed it, and
    # leave the caller's RNG state as it was.
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as scratch:
        pipe = import_untyped("diffusers").KolorsPipeline(
            **components(Path(scratch)), force_zeros_for_empty_prompt=False
        )
        for component in (pipe.vae, pipe.text_encoder, pipe.unet):
            for name, tensor in [*component.named_parameters(), *component.named_buffers()]:
                if not torch.isfinite(tensor).all():
                    raise RuntimeError(f"tiny model: {type(component).__name__}.{name} is not finite")
        with quiet_progress_bars():
            pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(README)
    marker = {"model": "kolors-api tiny", "version": TINY_VERSION, "random_weights": True,
              "note": "makes noise, not pictures"}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    # safetensors writes its files 0600; give every file the umask's mode, like the README.
    mode = (folder / "README.md").stat().st_mode & 0o777
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(mode)


def is_tiny_model(path: Path) -> bool:
    """Whether `path` holds a complete tiny model of the current version."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("version") == TINY_VERSION
        and (Path(path) / "model_index.json").is_file()
    )


def build_tiny_model(path: Path, *, overwrite: bool = False) -> Path:
    """Build the tiny pipeline into `path` and return it.

    `path` must not exist (or be an empty folder) unless `overwrite`. The build goes into a
    temporary sibling folder that is then renamed into place, so `path` is never half-written.
    """
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty")
    tmp = _scratch_sibling(path, "build")
    try:
        _build_into(tmp)
        _move_into_place(tmp, path, replace=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny_model(data_dir: Path) -> Path:
    """The tiny model under `data_dir/models/tiny`, built there on first use (`--model tiny`)."""
    target = Path(data_dir) / "models" / TINY_NAME
    if not is_tiny_model(target):
        tmp = _scratch_sibling(target, "build")
        try:
            _build_into(tmp)
            # Another process may have finished first: keep its (identical) build. A stale
            # build (older TINY_VERSION, or not ours) is replaced.
            if not is_tiny_model(target):
                _move_into_place(tmp, target, replace=target.exists())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not is_tiny_model(target):
            raise RuntimeError(f"could not put the tiny model in place at {target}")
    return target


def _scratch_sibling(path: Path, tag: str) -> Path:
    """A new empty folder next to `path` (same filesystem, so a rename moves it into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()  # mode from the umask, unlike tempfile.mkdtemp's 0o700
    return scratch


def _move_into_place(src: Path, dst: Path, *, replace: bool) -> None:
    """Rename `src` to `dst`; an existing `dst` is swapped out when `replace`, else kept."""
    if dst.is_dir() and not any(dst.iterdir()):
        dst.rmdir()
    try:
        os.rename(src, dst)
        return
    except OSError:
        if not replace:
            return
    old = _scratch_sibling(dst, "old")
    old.rmdir()
    os.rename(dst, old)
    os.rename(src, dst)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
