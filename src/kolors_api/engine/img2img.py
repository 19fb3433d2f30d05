"""Image to image (`kolors-img2img`): the start latents of a call's rows, from their input pictures.

The engine runs diffusers' `KolorsImg2ImgPipeline`, built around the loaded pipeline's components
(no second copy of the weights). Two things are done here rather than by the stock pipeline:

- the picture is made the output's size first (`kolors_api.images.fit`: cover, centre-crop); the
  stock pipeline would otherwise make an image of the input's size;
- the VAE encodes here, row by row with each row's own generator, exactly as the stock pipeline's
  `prepare_latents` does with a list of generators, and the pipeline gets the latents: its own
  encode would cast the shared VAE to float32 and back mid-call (the engine keeps a VAE that needs
  it in float32 for good, and other calls use it meanwhile).

Same seed and inputs give the bytes of the stock pipeline called with the fitted picture and that
seed (tests/test_img2img.py checks within 1/255).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kolors_api.engine._util import import_untyped
from kolors_api.images import fit, open_image
from kolors_api.schema import GenerateParams

Pipeline = Any


_PIPELINE_CLASS: Any = None


def _pipeline_class() -> Any:
    """`KolorsImg2ImgPipeline`, passing the pooled embeddings it is given on to `encode_prompt`
    (diffusers 0.3x-0.42 drop them there, so given embeddings fail; the engine's prompt cache gives them)."""
    global _PIPELINE_CLASS
    if _PIPELINE_CLASS is None:
        stock = import_untyped("diffusers").KolorsImg2ImgPipeline

        class Img2Img(stock):  # type: ignore[misc, valid-type]
            pooled: tuple[Any, Any] = (None, None)

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                self.pooled = (kwargs.get("pooled_prompt_embeds"), kwargs.get("negative_pooled_prompt_embeds"))
                return super().__call__(*args, **kwargs)

            def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
                if kwargs.get("prompt_embeds") is not None:
                    kwargs.setdefault("pooled_prompt_embeds", self.pooled[0])
                    kwargs.setdefault("negative_pooled_prompt_embeds", self.pooled[1])
                return super().encode_prompt(*args, **kwargs)

        _PIPELINE_CLASS = Img2Img
    return _PIPELINE_CLASS


def img2img_pipeline(base: Pipeline, scheduler: Any) -> Pipeline:
    """A `KolorsImg2ImgPipeline` sharing `base`'s modules, owning `scheduler`."""
    pipe = _pipeline_class()(
        **{**base.components, "scheduler": scheduler},
        force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(params: GenerateParams) -> Any:
    """The job's input picture, upright, RGB, fitted to its width×height (PIL)."""
    assert params.image is not None
    data = params.inputs.get(params.image)
    if data is None:
        raise RuntimeError(f"input picture {params.image[:12]}… was not read from the store")
    return fit(open_image(data), params.width, params.height)


def start_latents(pipe: Pipeline, jobs: Sequence[GenerateParams], generators: list[torch.Generator],
                  dtype: torch.dtype) -> torch.Tensor:
    """The VAE latents of every row of `jobs` (job n's picture for each of its images), each row
    sampled with its own generator, scaled as the pipeline scales them; `dtype` is the UNet's."""
    vae = pipe.vae
    device = pipe._execution_device
    pixels = {id(params): pipe.image_processor.preprocess(picture(params)) for params in jobs}
    vae_dtype = next(iter(vae.encoder.parameters())).dtype
    # as the stock pipeline: the pixels in the UNet's dtype first, then in the VAE's
    retrieve = import_untyped("diffusers.pipelines.kolors.pipeline_kolors_img2img").retrieve_latents
    rows = []
    n = 0
    for params in jobs:
        image = pixels[id(params)].to(device=device, dtype=dtype).to(vae_dtype)
        encoded = vae.encode(image)  # once per picture (as the stock pipeline's per-row encode gives it)
        for _ in range(params.number_of_images):
            rows.append(retrieve(encoded, generator=generators[n]))
            n += 1
    latents = torch.cat(rows).to(dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(device=device, dtype=dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(device=device, dtype=dtype)
        scaled: torch.Tensor = (latents - mean) * vae.config.scaling_factor / std
        return scaled
    scaled = latents * vae.config.scaling_factor
    return scaled
