"""The engine: a loaded Kolors pipeline that turns `GenerateParams` into encoded images.

One `Engine` holds the weights; every `generate` call builds its own scheduler and a shallow
`KolorsPipeline` around the shared components, so concurrent calls share no mutable state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kolors_api.engine._util import import_untyped, quiet_progress_bars
from kolors_api.engine.encode import encode_image
from kolors_api.schema import SCHEDULERS, GenerateParams

# diffusers ships no usable types: a KolorsPipeline is `Any` here.
Pipeline = Any

log = logging.getLogger(__name__)

# The Kolors text encoder (ChatGLM) sees at most this many tokens; longer prompts are truncated.
MAX_SEQUENCE_LENGTH = 256

# name -> (diffusers scheduler class name, extra from_config kwargs)
SCHEDULER_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "EulerDiscreteScheduler": ("EulerDiscreteScheduler", {}),
    "EulerAncestralDiscreteScheduler": ("EulerAncestralDiscreteScheduler", {}),
    "DPMSolverMultistepScheduler": ("DPMSolverMultistepScheduler", {}),
    "DPMSolverMultistepScheduler_SDE_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "UniPCMultistepScheduler": ("UniPCMultistepScheduler", {}),
    "DEISMultistepScheduler": ("DEISMultistepScheduler", {}),
}
if tuple(SCHEDULER_SPECS) != SCHEDULERS:  # pragma: no cover - a schema change must come here too
    raise RuntimeError("engine scheduler table out of step with schema.SCHEDULERS")


@dataclass
class GenerationOutput:
    images: list[bytes]  # encoded per params.output_format / output_quality
    seeds: list[int]  # params.seeds
    content_type: str  # params.content_type
    inference_time: float  # seconds spent in the pipeline call + encoding


def make_scheduler_from_config(name: str, base_config: Any) -> Any:
    """A fresh scheduler `name` (one of schema.SCHEDULERS) built from a scheduler config."""
    try:
        class_name, extra = SCHEDULER_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}") from None
    return getattr(import_untyped("diffusers"), class_name).from_config(base_config, **extra)


def resolve_model(model: str, data_dir: Path) -> str:
    """`tiny` -> the offline test model under `data_dir/models/tiny`, built on first use; anything
    else (a local diffusers folder or a Hugging Face repo id) is returned unchanged."""
    if model != "tiny":
        return model
    from kolors_api.engine.tiny import ensure_tiny_model  # the test-model builder, only when asked for

    return str(ensure_tiny_model(data_dir))


def _dtype_kwarg() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name still works but warns)."""
    try:
        deprecation_utils = import_untyped("diffusers.utils.deprecation_utils")
    except ImportError:  # pragma: no cover - older diffusers
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _may_have_fp16_variant(path: str) -> bool:
    """Hub repos may ship an fp16 variant; a local folder does when it holds `*.fp16.*` weight files."""
    local = Path(path)
    if not local.is_dir():
        return True
    return any(local.glob("*/*.fp16.*"))


def load_pipeline(path: str, dtype: torch.dtype, *, try_fp16_variant: bool) -> Pipeline:
    """`KolorsPipeline.from_pretrained`, trying the fp16 weight variant first when asked."""
    pipeline_class = import_untyped("diffusers").KolorsPipeline
    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype}
    with quiet_progress_bars():
        if try_fp16_variant and _may_have_fp16_variant(path):
            try:
                return pipeline_class.from_pretrained(path, variant="fp16", **kwargs)
            except (OSError, ValueError) as exc:
                log.info("no fp16 variant of %s (%s); loading the default weights", path, exc)
        return pipeline_class.from_pretrained(path, **kwargs)


class Engine:
    """A Kolors pipeline on one device: `generate(params)` -> encoded images."""

    def __init__(
        self, model: str, *, data_dir: Path = Path(".kolors-api"), device: str | None = None
    ) -> None:
        self.model = model
        self.path = resolve_model(model, Path(data_dir))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = torch.device(self.device).type == "cuda"
        dtype = torch.float16 if on_cuda else torch.float32
        self.dtype_name = str(dtype).removeprefix("torch.")
        pipe = load_pipeline(self.path, dtype, try_fp16_variant=on_cuda)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        # The pipeline would upcast an fp16 VAE to fp32 for every decode and back again, mutating
        # the shared module mid-call; keep it in fp32 once (as the pipeline's upcast does) and
        # decode ourselves instead.
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(dtype=torch.float32)
        # On a GPU, decode one image at a time: ten 2048x2048 images decoded at once need tens of
        # GiB of activations. On CPU decode the batch at once, exactly as KolorsPipeline does.
        self.decode_one_by_one = on_cuda
        self.pipe = pipe

    def make_scheduler(self, name: str) -> Any:
        """A fresh scheduler per call, from the loaded pipeline's scheduler config."""
        return make_scheduler_from_config(name, self.pipe.scheduler.config)

    def _call_pipeline(self, scheduler: Any) -> Pipeline:
        """A shallow pipeline sharing the loaded weights but owning `scheduler` (never mutate self.pipe)."""
        base = self.pipe
        pipe = import_untyped("diffusers").KolorsPipeline(
            **{**base.components, "scheduler": scheduler},
            force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(
        self, params: GenerateParams, on_step: Callable[[int, int], None] | None = None
    ) -> GenerationOutput:
        """Run one request: `params.number_of_images` images in one batch, image i from seed+i.

        `on_step(step, total)` is called after each denoising step (step 1..total); an exception
        it raises aborts the run and propagates out of here (cancellation, lost leases).

        Same params, same device: same bytes. Image i of a batch starts from the same noise as a
        single-image run with seed+i and looks the same, but is not always bit-identical to it:
        batched kernels may round a few pixels differently."""
        start = time.perf_counter()
        pipe = self._call_pipeline(self.make_scheduler(params.scheduler))
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in params.seeds]

        def step_end(p: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(i + 1, p.num_timesteps)
            return {}

        with torch.inference_mode():
            latents = pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                guidance_scale=params.cfg,
                num_inference_steps=params.steps,
                width=params.width,
                height=params.height,
                num_images_per_prompt=params.number_of_images,
                generator=generators,
                output_type="latent",
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                callback_on_step_end=step_end if on_step is not None else None,
                callback_on_step_end_tensor_inputs=[],
            ).images
            images = self._decode(pipe, latents)
        encoded = [encode_image(image, params.output_format, params.output_quality) for image in images]
        return GenerationOutput(
            images=encoded,
            seeds=params.seeds,
            content_type=params.content_type,
            inference_time=time.perf_counter() - start,
        )

    def _decode(self, pipe: Pipeline, latents: torch.Tensor) -> list[Any]:
        """Latents -> PIL images, as KolorsPipeline does it (its VAE may be kept in fp32 here)."""
        vae = pipe.vae
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        latents = latents / vae.config.scaling_factor
        if self.decode_one_by_one:
            parts = [vae.decode(latents[i : i + 1], return_dict=False)[0] for i in range(len(latents))]
            image = torch.cat(parts)
        else:
            image = vae.decode(latents, return_dict=False)[0]
        return list(pipe.image_processor.postprocess(image, output_type="pil"))
