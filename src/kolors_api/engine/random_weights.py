"""Random-weight Kolors pipelines built in memory on the target device: `--model random:full` (the
real model's shapes and costs, for benchmarks where the weights cannot be downloaded) and
`--model random:small` (the `tiny` model's shapes and weights, without files).

`full` takes its configs from the published Kwai-Kolors/Kolors-diffusers model (unet, vae and
text_encoder `config.json`): a ≈2.6 B-parameter SDXL-style UNet with 10-layer transformers at its
lowest level, ChatGLM3-6B (28 layers, hidden 4096, ≈6.2 B parameters) and SDXL's VAE. Modules are
built on the `meta` device and every parameter is then drawn directly on the target device in the
target dtype, so nothing of the ≈17 GB (fp16) passes through host memory or disk. Its tokenizer is
the tiny model's (the real ChatGLM3 vocabulary cannot be had offline): prompts are padded to the
same 256 tokens, so the cost is the real one. It makes noise, not pictures.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kolors_api.engine._util import import_untyped, init_rule, resolve_dtype
from kolors_api.settings import RANDOM_MODEL_SIZES

#: unet/config.json of Kwai-Kolors/Kolors-diffusers (the keys that differ from diffusers' defaults).
FULL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "norm_num_groups": 32,
    "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 4096,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "addition_embed_type_num_heads": 64, "projection_class_embeddings_input_dim": 5632,
}
#: vae/config.json: SDXL's VAE.
FULL_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}
#: text_encoder/config.json: ChatGLM3-6B.
FULL_TEXT_ENCODER: dict[str, Any] = {
    "num_layers": 28, "padded_vocab_size": 65024, "hidden_size": 4096, "ffn_hidden_size": 13696,
    "kv_channels": 128, "num_attention_heads": 32, "seq_length": 32768,
    "multi_query_attention": True, "multi_query_group_num": 2,
    "add_qkv_bias": True, "add_bias_linear": False, "original_rope": True, "rmsnorm": True,
    "post_layer_norm": True, "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True,
    "fp32_residual_connection": False, "layernorm_epsilon": 1e-5, "use_cache": True,
}


def full_modules() -> dict[str, Any]:
    """The full-size UNet, VAE and text encoder on the `meta` device (shapes only, no memory)."""
    diffusers = import_untyped("diffusers")
    glm = import_untyped("diffusers.pipelines.kolors.text_encoder")
    with torch.device("meta"):
        return {
            "unet": diffusers.UNet2DConditionModel(**FULL_UNET),
            "vae": diffusers.AutoencoderKL(**FULL_VAE),
            "text_encoder": glm.ChatGLMModel(glm.ChatGLMConfig(**FULL_TEXT_ENCODER), empty_init=False),
        }


def _materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator) -> None:
    """Replace every `meta` parameter by one drawn on `device` by the tiny model's rule (`init_rule`)."""
    for _, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            constant, std = init_rule(module, name, param)
            tensor = torch.empty(param.shape, device=device, dtype=dtype)
            if constant is not None:
                tensor.fill_(constant)
            else:
                tensor.normal_(0.0, std, generator=generator)
            setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))
    leftover = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if leftover:
        raise RuntimeError(f"random model: no rule for the buffers {leftover} of {type(model).__name__}")


def _full_components(device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    modules = full_modules()
    generator = torch.Generator(device=device).manual_seed(seed)
    text_encoder = modules["text_encoder"]
    rotary = text_encoder.rotary_pos_emb
    dim = rotary.dim
    # The one buffer of the three: ChatGLM's rotary inverse frequencies, from their definition, in
    # `dtype` as `.to(dtype)` leaves them in a loaded model (the rotary cache takes its dtype from it).
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    rotary.inv_freq = inv_freq.to(dtype)
    for module in modules.values():
        _materialize(module, device, dtype, generator)
    from kolors_api.engine import tiny  # its tokenizer and scheduler: the real ones are not at hand

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tiny._tokenizer(Path(scratch))
    return {**{name: module.eval() for name, module in modules.items()}, "tokenizer": tokenizer,
            "scheduler": tiny._scheduler(), "image_encoder": None, "feature_extractor": None}


def build_random_pipeline(size: str, *, device: str | torch.device, dtype: torch.dtype,
                          seed: int = 0) -> Any:
    """A `KolorsPipeline` of random weights of `size` ("small" or "full") on `device` in `dtype`."""
    device = torch.device(device)
    if size == "full":
        components = _full_components(device, dtype, seed)
    elif size == "small":
        from kolors_api.engine import tiny

        with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as scratch:
            components = tiny.components(Path(scratch))
        for name in ("vae", "text_encoder", "unet"):
            module = components[name].to(device)
            components[name] = module if dtype == torch.float32 else module.to(dtype)
    else:
        raise ValueError(f"unknown random model size {size!r}; expected one of {', '.join(RANDOM_MODEL_SIZES)}")
    return import_untyped("diffusers").KolorsPipeline(**components, force_zeros_for_empty_prompt=False)


def parameter_counts(pipe: Any) -> dict[str, int]:
    """Parameters per component of a pipeline (or of `full_modules()`)."""
    parts = pipe if isinstance(pipe, dict) else pipe.components
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in parts.items() if isinstance(module, torch.nn.Module)}


def build_report(size: str, *, device: str | None, dtype: str) -> dict[str, Any]:
    """Build `random:size` on `device` (default cuda if present) in `dtype` ("auto" or a name) and
    say what it took: parameters per component, seconds, device memory (`kolors-api random-model`)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, on_cuda=target.type == "cuda")
    started = time.perf_counter()
    pipe = build_random_pipeline(size, device=target, dtype=torch_dtype)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    counts = parameter_counts(pipe)
    return {
        "model": f"random:{size}", "device": str(target), "dtype": str(torch_dtype).removeprefix("torch."),
        "parameters": counts, "total_parameters": sum(counts.values()),
        "build_seconds": round(time.perf_counter() - started, 2),
        "cuda_allocated_bytes": torch.cuda.memory_allocated(target) if target.type == "cuda" else None,
    }
