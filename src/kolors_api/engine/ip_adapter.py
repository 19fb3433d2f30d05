"""The Kolors IP-Adapter-Plus (`--ip-adapter REPO|PATH|tiny`): loaded once, switched on per call.

`load` runs diffusers' own `load_ip_adapter` on the loaded pipeline (the layout of
Kwai-Kolors/Kolors-IP-Adapter-Plus: `image_encoder/` and `ip_adapter_plus_general.safetensors`;
`tiny` builds the tiny one beside the tiny model, `engine.tiny_ip_adapter`). Loading changes the
UNet for good (its cross-attention processors, its encoder projection), and a UNet so changed
needs image embeddings on every call; `Modes` keeps both sets of modules and puts the plain one
back, so a call without a reference (or at scale 0) runs exactly the code, and gives exactly the
bytes, of a server without an IP-Adapter. The engine switches under `Modes.lock` (one call at a time).

Rows of one call may have different references (at one scale: `jobs.batching.SHAPE_FIELDS`); the
embeddings are computed here per job, in the order and shape `prepare_ip_adapter_image_embeds` takes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kolors_api.engine._util import quiet_progress_bars
from kolors_api.images import open_image
from kolors_api.schema import GenerateParams

WEIGHT_NAME = "ip_adapter_plus_general.safetensors"


@dataclass
class Modes:
    """The UNet's plain and IP-Adapter modules; `use(unet, on)` puts one set in place."""

    plain: tuple[dict[str, Any], Any, str]
    adapter: tuple[dict[str, Any], Any, str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    on: bool = True

    def use(self, unet: Any, on: bool) -> None:
        if on == self.on:
            return
        processors, projection, kind = self.adapter if on else self.plain
        # the projection first: the IP-Adapter's has attention layers of its own, counted by `set_attn_processor`
        unet.encoder_hid_proj = projection
        unet.config.encoder_hid_dim_type = kind
        unet.set_attn_processor(dict(processors))
        self.on = on


def _state(unet: Any) -> tuple[dict[str, Any], Any, str]:
    return dict(unet.attn_processors), unet.encoder_hid_proj, str(unet.config.encoder_hid_dim_type)


def source_path(source: str, model_path: str) -> str:
    """`tiny` -> the tiny IP-Adapter beside the tiny model (built when missing); else as given."""
    if source != "tiny":
        return source
    from kolors_api.engine.tiny_ip_adapter import ensure_tiny_ip_adapter

    return str(ensure_tiny_ip_adapter(Path(model_path)))


def load(pipe: Any, source: str, model_path: str) -> Modes:
    """Load the IP-Adapter into `pipe` (already on its device) through `load_ip_adapter`; plain mode on."""
    plain = _state(pipe.unet)
    with quiet_progress_bars():
        pipe.load_ip_adapter(source_path(source, model_path), subfolder="", weight_name=WEIGHT_NAME,
                             image_encoder_folder="image_encoder")
    modes = Modes(plain=plain, adapter=_state(pipe.unet))
    modes.use(pipe.unet, False)
    return modes


def image_embeds(pipe: Any, jobs: Sequence[GenerateParams], guidance: bool) -> list[torch.Tensor]:
    """`ip_adapter_image_embeds` for the rows of `jobs` (job n's reference for each of its images):
    negatives then positives when `guidance`, as the pipeline's own preparation lays them out."""
    device = pipe._execution_device
    positive, negative = [], []
    for params in jobs:
        assert params.ip_adapter_image is not None
        reference = open_image(params.inputs[params.ip_adapter_image], "ip_adapter_image")
        cond, uncond = pipe.encode_image(reference, device, 1, output_hidden_states=True)
        positive.append(cond[None].repeat(params.number_of_images, *[1] * cond.ndim))
        negative.append(uncond[None].repeat(params.number_of_images, *[1] * uncond.ndim))
    rows = torch.cat(positive)
    return [torch.cat([torch.cat(negative), rows]) if guidance else rows]
