"""Previews of a running job, made from its latents: a fixed linear map, never through the VAE.

Kolors denoises in the latent space of the SDXL VAE (4 channels, 1/8 of the image size, scaled by
its `scaling_factor` 0.13025). A linear map of those 4 channels to RGB, plus a bias, gives a rough
picture at latent resolution: the well-known SDXL latent-to-RGB factors (the ones ComfyUI and the
A1111 web UI use for their fast previews). It costs one 4×3 matrix product and a small webp
encode, a small fraction of a denoising step (`bench/previews.py` measures it).
"""

from __future__ import annotations

import functools
import io

import torch
from PIL import Image

#: Rows: latent channels 0..3; columns: R, G, B. For latents as the UNet sees them (scaled).
LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
#: webp quality of a preview (small, and only a glimpse).
PREVIEW_QUALITY = 60


@functools.lru_cache(maxsize=8)
def _factors(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=device),
            torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=device))


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """One image's latents (4, h, w) as RGB pixels (h, w, 3), uint8, on the latents' device."""
    if latents.ndim != 3 or latents.shape[0] != len(LATENT_RGB_FACTORS):
        raise ValueError(f"previews: expected latents of shape (4, h, w), got {tuple(latents.shape)}")
    _, height, width = latents.shape
    factors, bias = _factors(latents.device)
    rgb = torch.addmm(bias, latents.reshape(4, -1).t().float(), factors)  # (h*w, 3), about [-1, 1]
    # -> [0, 255], rounded by the +0.5 before the cast; a non-finite latent (a diverging run) is black
    # or white there and never breaks the encode
    rgb = rgb.mul_(127.5).add_(128.0).nan_to_num_(nan=0.0, posinf=255.0, neginf=0.0).clamp_(0, 255)
    return rgb.to(torch.uint8).reshape(height, width, 3)


def preview_webp(latents: torch.Tensor, quality: int = PREVIEW_QUALITY) -> bytes:
    """One image's latents (4, h, w) as a webp of h × w pixels (1/8 of the image's size)."""
    pixels = latents_to_rgb(latents).cpu().numpy()
    out = io.BytesIO()
    # method 0: the fastest encoder setting (at this size also the smallest file)
    Image.fromarray(pixels, "RGB").save(out, "WEBP", quality=quality, method=0)
    return out.getvalue()
