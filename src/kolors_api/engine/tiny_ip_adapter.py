"""A tiny Kolors IP-Adapter-Plus for the tiny model, built offline and deterministically.

It has the layout of Kwai-Kolors/Kolors-IP-Adapter-Plus, so `--ip-adapter tiny` loads it through the
very path real weights take (`load_ip_adapter`):

    <tiny model>/ip_adapter/image_encoder/          a CLIPVisionModelWithProjection (32 px, 2 layers)
    <tiny model>/ip_adapter/ip_adapter_plus_general.safetensors
        image_proj.*   the Plus resampler (4 blocks, as the real one), in the original IP-Adapter key names
        ip_adapter.*   to_k_ip / to_v_ip of every cross-attention layer of the tiny UNet

The weights are random (seeded): it steers noise, not pictures. diffusers' own tests build their
tiny IP-Adapters the same way, from small configs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kolors_api.engine._util import import_untyped

WEIGHT_NAME = "ip_adapter_plus_general.safetensors"
FOLDER = "ip_adapter"
SEED = 20240717
CLIP_HIDDEN = 32
QUERIES = 4


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Every parameter from numpy's generator, in name order (LayerNorms: weight 1, bias 0)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            if "norm" in name or ".ln" in name or "layer_norm" in name or "layernorm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.copy_(torch.from_numpy(rng.standard_normal(tuple(param.shape), dtype=np.float32) * 0.05))


def _image_encoder() -> Any:
    transformers = import_untyped("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=CLIP_HIDDEN, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=2, image_size=32, patch_size=4, projection_dim=32)
    model = transformers.CLIPVisionModelWithProjection(config)
    _fill(model, SEED)
    return model.eval()


def _image_proj(cross_attention_dim: int) -> dict[str, torch.Tensor]:
    """The Plus resampler's weights in the original IP-Adapter names (diffusers converts them on load)."""
    proj = import_untyped("diffusers.models.embeddings").IPAdapterPlusImageProjection(
        embed_dims=CLIP_HIDDEN, output_dims=cross_attention_dim, hidden_dims=64, heads=1, num_queries=QUERIES)
    _fill(proj, SEED + 1)
    out: dict[str, torch.Tensor] = {}
    for name, value in proj.state_dict().items():
        head, _, rest = name.partition(".")
        if head != "layers":
            out[name] = value
            continue
        index, _, leaf = rest.partition(".")
        original = (leaf.replace("ln0.", "0.norm1.").replace("ln1.", "0.norm2.")
                    .replace("attn.to_out.0.", "0.to_out.").replace("attn.to_q.", "0.to_q.")
                    .replace("ff.0.", "1.0.").replace("ff.1.net.0.proj.", "1.1.").replace("ff.1.net.2.", "1.3."))
        if leaf.startswith("attn.to_k."):
            value = torch.cat([value, proj.state_dict()[name.replace("to_k", "to_v")]])
            original = leaf.replace("attn.to_k.", "0.to_kv.")
        elif leaf.startswith("attn.to_v."):
            continue
        out[f"layers.{index}.{original}"] = value
    return out


def _ip_layers(unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """to_k_ip / to_v_ip for every cross-attention processor of the UNet, keyed as the original (1, 3, 5…)."""
    unet = import_untyped("diffusers").UNet2DConditionModel.from_config(unet_config)
    channels = list(unet_config["block_out_channels"])
    cross = int(unet_config["cross_attention_dim"])
    rng = np.random.default_rng(SEED + 2)
    out: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for kind in ("to_k_ip", "to_v_ip"):
            out[f"{key_id}.{kind}.weight"] = torch.from_numpy(
                rng.standard_normal((hidden, cross), dtype=np.float32) * 0.05)
        key_id += 2
    return out


def build_tiny_ip_adapter(model: Path) -> Path:
    """Build the tiny IP-Adapter for the tiny model at `model` into `model/ip_adapter` (replaced); its path."""
    from safetensors.torch import save_file

    model = Path(model)
    unet_config = json.loads((model / "unet" / "config.json").read_text())
    target = model / FOLDER
    scratch = model / f".{FOLDER}.build"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    _image_encoder().save_pretrained(scratch / "image_encoder")
    projection = _image_proj(int(unet_config["cross_attention_dim"]))
    tensors = {f"image_proj.{k}": v.contiguous() for k, v in projection.items()}
    tensors |= {f"ip_adapter.{k}": v.contiguous() for k, v in _ip_layers(unet_config).items()}
    save_file(tensors, str(scratch / WEIGHT_NAME))
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    return target


def ensure_tiny_ip_adapter(model: Path) -> Path:
    """The tiny IP-Adapter beside the tiny model at `model`, built there when missing."""
    target = Path(model) / FOLDER
    if not (target / WEIGHT_NAME).is_file() or not (target / "image_encoder" / "config.json").is_file():
        build_tiny_ip_adapter(Path(model))
    return target
