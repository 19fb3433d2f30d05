"""The engine: a loaded Kolors pipeline that turns `GenerateParams` into encoded images.

One `Engine` holds the weights; every `generate` call builds its own scheduler and a shallow
`KolorsPipeline` around the shared components, so concurrent calls share no mutable state but the
prompt-embedding cache (`prompt_cache`, locked).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kolors_api.engine._util import import_untyped, quiet_progress_bars, resolve_dtype
from kolors_api.engine.encode import encode_image
from kolors_api.engine.img2img import img2img_pipeline, start_latents
from kolors_api.engine.previews import preview_webp
from kolors_api.engine.prompt_cache import PromptCache
from kolors_api.jobs.batching import BatchLimits, shape
from kolors_api.schema import SCHEDULERS, GenerateParams
from kolors_api.settings import random_model_size

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


#: Images with more pixels than this are decoded tile by tile (the VAE's activations grow with area).
TILED_DECODE_ABOVE = 1536 * 1536
#: The row counts a padded call runs at: a compiled UNet has one graph per count, all made at start,
#: so no batch the worker forms compiles after ready (a call of 3 images runs 4 rows, 1 dropped).
BATCH_ROWS = (1, 2, 4, 8, 16)


def padded_rows(rows: int) -> int:
    """The rows a call of `rows` images runs with padding: the next of `BATCH_ROWS` (or `rows` above them)."""
    return next((size for size in BATCH_ROWS if size >= rows), rows)


@dataclass(frozen=True)
class EngineOptions:
    """How an `Engine` runs its pipeline (the settings of the same names)."""

    dtype: str = "auto"  # "auto", or a key of DTYPES
    compile: bool = False  # torch.compile the UNet, warmed up for `compile_shapes` by `warm_up`
    compile_shapes: tuple[tuple[int, int], ...] = ((1024, 1024),)  # (width, height)
    vae: str | None = None  # another VAE (an fp16-safe one runs in fp16 instead of fp32)
    offload: bool = False  # keep each model on the CPU until it runs (cards of about 16 GB)
    prompt_cache_mb: int = 256  # prompt embeddings kept on the device, least recently used out
    #: With `compile`: "pad" pads each call to the next of `BATCH_ROWS` rows (one static graph per
    #: size, all compiled by `warm_up`), "dynamic" compiles one graph with dynamic shapes instead.
    compile_batches: str = "pad"
    #: Where compiled kernels are kept across restarts (Inductor's and Triton's caches); None: theirs.
    compile_cache: str | None = None
    #: Pad calls to `BATCH_ROWS` also without `compile` (tests; None: with `compile` in "pad" mode).
    pad_batches: bool | None = None
    #: The worker's images per call (`max_batch_images`; 0: `Engine.batch_limits`): the padded
    #: sizes compiled at start go up to it.
    batch_images: int = 0
    #: The Kolors IP-Adapter-Plus: a repo id, a folder of its layout, or `tiny` (`engine.ip_adapter`).
    ip_adapter: str | None = None


@dataclass
class GenerationOutput:
    images: list[bytes]  # encoded per params.output_format / output_quality
    seeds: list[int]  # params.seeds
    content_type: str  # params.content_type
    inference_time: float  # seconds spent in the pipeline call (and encoding, unless deferred)
    peak_memory_bytes: int | None = None  # the accelerator's peak allocation during the call (CUDA)
    #: With `generate_batch(..., defer_encoding=True)`: `images` is empty until `encode()` (any thread)
    #: returns them, so the engine can take the next batch meanwhile.
    encode: Callable[[], list[bytes]] | None = None


def use_compile_cache(path: str | None) -> None:
    """Keep Inductor's and Triton's compiled artifacts under `path` (kept across restarts: a restart
    with the same settings loads its kernels instead of compiling them again)."""
    if not path:
        return
    root = Path(path).expanduser()
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(root / sub)
    log.info("compile cache: %s", root)


def _encoder(images: list[Any], params: GenerateParams) -> Callable[[], list[bytes]]:
    return lambda: [encode_image(image, params.output_format, params.output_quality) for image in images]


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


def load_vae(path: str, dtype: torch.dtype) -> Any:
    """An `AutoencoderKL` from a diffusers folder or repo (its own root or a `vae` subfolder)."""
    autoencoder = import_untyped("diffusers").AutoencoderKL
    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype}
    with quiet_progress_bars():
        if Path(path, "vae", "config.json").is_file():
            return autoencoder.from_pretrained(path, subfolder="vae", **kwargs)
        return autoencoder.from_pretrained(path, **kwargs)


class Engine:
    """A Kolors pipeline on one device: `generate(params)` -> encoded images."""

    def __init__(
        self, model: str, *, data_dir: Path = Path(".kolors-api"), device: str | None = None,
        options: EngineOptions | None = None, pipeline: Pipeline | None = None,
    ) -> None:
        """`pipeline`: an already loaded KolorsPipeline to run (benchmarks); `model` then only names it."""
        self.model = model
        self.options = options = options or EngineOptions()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.on_cuda = torch.device(self.device).type == "cuda"
        dtype = resolve_dtype(options.dtype, on_cuda=self.on_cuda)
        size = random_model_size(model)
        if pipeline is not None:
            self.path, pipe = model, pipeline
        elif size is not None:
            self.path = model
            from kolors_api.engine.random_weights import build_random_pipeline

            pipe = build_random_pipeline(size, device="cpu" if options.offload else self.device, dtype=dtype)
        else:
            self.path = resolve_model(model, Path(data_dir))
            pipe = load_pipeline(self.path, dtype, try_fp16_variant=self.on_cuda and dtype != torch.float32)
        if options.vae:
            pipe.register_modules(vae=load_vae(options.vae, dtype))
        self.dtype_name = str(pipe.unet.dtype).removeprefix("torch.")
        self.prompts = PromptCache(options.prompt_cache_mb * 2**20)
        self.pipe = self._place(pipe)
        self.ip_adapter: Any = None
        if options.ip_adapter:
            from kolors_api.engine import ip_adapter

            self.ip_adapter = ip_adapter.load(self.pipe, options.ip_adapter, self.path)
            log.info("IP-Adapter %s loaded", options.ip_adapter)

    @contextlib.contextmanager
    def _reference(self, pipe: Pipeline, jobs: list[GenerateParams]) -> Iterator[dict[str, Any]]:
        """The pipeline arguments of the IP-Adapter for a call's rows (none without a reference or at
        scale 0: then the UNet runs plain, exactly as without an IP-Adapter), its modules in place."""
        first = jobs[0]
        scale = first.ip_adapter_scale if first.ip_adapter_image is not None else None
        if self.ip_adapter is None:
            if scale:
                raise ValueError("this engine has no IP-Adapter (start the worker with --ip-adapter)")
            yield {}
            return
        from kolors_api.engine.ip_adapter import image_embeds

        with self.ip_adapter.lock:
            self.ip_adapter.use(pipe.unet, bool(scale))
            if not scale:
                yield {}
                return
            pipe.set_ip_adapter_scale(scale)
            yield {"ip_adapter_image_embeds": image_embeds(pipe, jobs, first.cfg > 1)}

    def _place(self, pipe: Pipeline) -> Pipeline:
        """Put the loaded pipeline on the device, tuned for it."""
        if self.options.offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        # The pipeline would upcast an fp16 VAE to fp32 for every decode and back again, mutating
        # the shared module mid-call; keep a VAE that needs it in fp32 once (as the pipeline's
        # upcast does) and decode ourselves instead. An fp16-safe VAE (`vae`) stays in fp16.
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(dtype=torch.float32)
        if self.on_cuda:
            # Convolutions in NHWC are what the tensor cores' kernels take without a transpose.
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
        log.info("engine %s on %s: %s, attention %s%s", self.model, self.device, self.dtype_name,
                 ", ".join(sorted(processors)), ", compiled UNet" if self.options.compile else "")
        if self.options.compile:
            # Inductor's shape reasoning logs a warning per guard it cannot evaluate: hundreds per compile.
            logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)
            use_compile_cache(self.options.compile_cache)
            if self.options.compile_batches == "dynamic":
                pipe.unet = torch.compile(pipe.unet, dynamic=True)
            else:
                # One static graph per (shape, rows): never a dynamic recompile, and room for them all.
                dynamo = import_untyped("torch._dynamo")
                limit = len(BATCH_ROWS) * max(1, len(self.options.compile_shapes)) * 2 + 8
                for name in ("recompile_limit", "cache_size_limit"):
                    if hasattr(dynamo.config, name):
                        setattr(dynamo.config, name, max(getattr(dynamo.config, name), limit))
                pipe.unet = torch.compile(pipe.unet, dynamic=False)
        # On a GPU, decode one image at a time: ten 2048x2048 images decoded at once need tens of
        # GiB of activations. On CPU decode the batch at once, exactly as KolorsPipeline does.
        self.decode_one_by_one = self.on_cuda
        return pipe

    def warm_up(self) -> None:
        """One small image (kernel selection and allocator growth are not the first job's) or, with
        `compile`, one per compile shape (compilation is not a job's either; a shape compiled only to
        warm up would cost minutes and turn the next compilation dynamic)."""
        if not self.options.compile:
            self.generate(GenerateParams(prompt="warm-up", steps=1, width=512, height=512))
            return
        most = self.options.batch_images or self.batch_limits().max_images
        rows = [n for n in BATCH_ROWS if n < 2 * most] if self.pad_batches else [1]
        for width, height in self.options.compile_shapes:
            for n in rows:
                started = time.perf_counter()
                # one job of n images (above the API's 10 too: the engine takes it as it comes)
                params = replace(GenerateParams(prompt="warm-up", steps=2, width=width, height=height),
                                 number_of_images=n)
                self.generate(params)
                log.info("compiled for %dx%d, %d row(s), in %.1fs", width, height, n, time.perf_counter() - started)

    @property
    def pad_batches(self) -> bool:
        """Whether calls are padded to `BATCH_ROWS` (see `EngineOptions.pad_batches`)."""
        if self.options.pad_batches is not None:
            return self.options.pad_batches
        return self.options.compile and self.options.compile_batches == "pad"

    def batch_limits(self) -> BatchLimits:
        """How large a call this engine takes by default (the worker's batching; settings override):
        on CPU 8 images, four 1024² images of pixels; on a GPU by its memory, 2 GiB per 1024² image
        above 24 GiB, at most 16 (16 on 80 GB cards). That is cautious: on an H200 the real model's
        peak was 20.4 GiB for one seed-sized image and 20.5 GiB for eight (decoded one at a time).
        No batching when offloaded."""
        if self.options.offload:
            return BatchLimits()
        megapixel_images = 4
        if self.on_cuda:
            free_gib = torch.cuda.get_device_properties(self.device).total_memory / 2**30 - 24
            megapixel_images = max(1, min(16, int(free_gib // 2)))
        return BatchLimits(max_images=max(8, megapixel_images), max_pixels=megapixel_images * 1024 * 1024)

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

    def generate(self, params: GenerateParams, on_step: Callable[..., None] | None = None) -> GenerationOutput:
        """Run one request: `params.number_of_images` images in one batch, image i from seed+i.

        `on_step(step, total, preview)` is called after each denoising step (step 1..total); an
        exception it raises aborts the run and propagates out of here (cancellation, lost leases).
        `preview()` returns a small webp of the first image at that step (`engine.previews`), made
        only when called, and only valid during that call.

        Same params, same device: same bytes. Image i of a batch starts from the same noise as a
        single-image run with seed+i and looks the same, but is not always bit-identical to it:
        batched kernels may round a few pixels differently."""
        out = self.generate_batch([(params, on_step)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    @property
    def defer_encoding(self) -> bool:
        """Whether the worker should encode images off the engine thread (`generate_batch`'s
        `defer_encoding`): on a GPU the CPU is free while the next batch denoises; on CPU encoding
        would take cores from it (bench/generation.py measures both)."""
        return self.on_cuda

    def generate_batch(
        self, jobs: Sequence[tuple[GenerateParams, Callable[..., None] | None]], *, defer_encoding: bool = False,
    ) -> list[GenerationOutput | BaseException]:
        """Run several requests of one shape (`jobs.batching.SHAPE_FIELDS`) in one pipeline call.

        Each job keeps its own prompts, seeds (image i from seed+i: its own generators, so also the
        stochastic schedulers draw its noise as a run of its own would), number of images and output
        format; its `on_step(step, total, preview)` as in `generate` (the preview of its own first
        image). A job whose `on_step` raises is dropped from the outputs (its rows still run to the
        end of the call; no scheduler can lose batch rows mid-run) and gets that exception as its
        result; the call stops early only when every job was dropped. An error of the pipeline
        itself is every job's result. `defer_encoding`: each output's `encode()` encodes its images."""
        first = jobs[0][0]
        for params, _ in jobs[1:]:
            if shape(params.to_dict()) != shape(first.to_dict()):
                raise ValueError("generate_batch: jobs of different shapes cannot share a pipeline call")
        start = time.perf_counter()
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        scheduler = self.make_scheduler(first.scheduler)
        pipe = self._call_pipeline(scheduler) if first.image is None else img2img_pipeline(self.pipe, scheduler)
        rows = sum(params.number_of_images for params, _ in jobs)
        pad = padded_rows(rows) - rows if self.pad_batches else 0
        # Padding rows: the first job's prompt (a cache hit) with generators of their own; dropped.
        padding = [(replace(first, number_of_images=pad, seed=0), None)] if pad else []
        run = [*jobs, *padding]
        generators = [torch.Generator(device=self.device).manual_seed(seed)
                      for params, _ in run for seed in params.seeds]
        dropped: dict[int, BaseException] = {}
        watched = [(n, on_step) for n, (_, on_step) in enumerate(jobs) if on_step is not None]
        first_rows = [sum(params.number_of_images for params, _ in jobs[:n]) for n in range(len(jobs))]

        def step_end(p: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            latents = tensors["latents"]
            for n, on_step in watched:
                if n not in dropped:
                    try:
                        on_step(i + 1, p.num_timesteps, lambda row=first_rows[n]: preview_webp(latents[row]))
                    except Exception as exc:
                        dropped[n] = exc
            if len(dropped) == len(jobs):
                raise dropped[min(dropped)]
            return {}

        try:
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                pictures: dict[str, Any] = stack.enter_context(self._reference(pipe, [params for params, _ in run]))
                if first.image is not None:  # image to image: the rows' start latents (engine.img2img)
                    pictures |= {"image": start_latents(pipe, [params for params, _ in run], generators,
                                                        pipe.unet.dtype), "strength": first.strength}
                latents = pipe(
                    **self._embeddings(pipe, [params for params, _ in run]),
                    **pictures,
                    guidance_scale=first.cfg,
                    num_inference_steps=first.steps,
                    width=first.width,
                    height=first.height,
                    num_images_per_prompt=1,
                    generator=generators,
                    output_type="latent",
                    max_sequence_length=MAX_SEQUENCE_LENGTH,
                    callback_on_step_end=step_end if watched else None,
                    callback_on_step_end_tensor_inputs=["latents"] if watched else [],
                ).images
                # the kept jobs' rows decoded in one go (on CPU one VAE call, as KolorsPipeline does)
                kept = [latents[first_rows[n] : first_rows[n] + params.number_of_images]
                        for n, (params, _) in enumerate(jobs) if n not in dropped]
                images = self._decode(pipe, torch.cat(kept)) if kept else []
                outputs: list[GenerationOutput | BaseException] = []
                for n, (params, _) in enumerate(jobs):
                    if n in dropped:
                        outputs.append(dropped[n])
                        continue
                    encode = _encoder(images[:params.number_of_images], params)
                    images = images[params.number_of_images:]
                    outputs.append(GenerationOutput(images=[] if defer_encoding else encode(), seeds=params.seeds,
                                                    content_type=params.content_type, inference_time=0.0,
                                                    encode=encode if defer_encoding else None))
        except Exception as exc:
            return [dropped.get(n, exc) for n in range(len(jobs))]
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) if self.on_cuda else None
        for out in outputs:
            if isinstance(out, GenerationOutput):
                out.inference_time, out.peak_memory_bytes = elapsed, peak
        return outputs

    def _embeddings(self, pipe: Pipeline, jobs: list[GenerateParams]) -> dict[str, Any]:
        """The pipeline's embedding arguments for every image of `jobs`, in order (prompt cache first)."""
        parts = [self.prompts.encode(pipe, params.prompt, params.negative_prompt if params.cfg > 1 else None,
                                     device=pipe._execution_device, max_sequence_length=MAX_SEQUENCE_LENGTH)
                 .pipeline_kwargs(params.number_of_images) for params in jobs]
        if len(parts) == 1:
            return parts[0]
        return {name: None if parts[0][name] is None else torch.cat([part[name] for part in parts])
                for name in parts[0]}

    def _decode(self, pipe: Pipeline, latents: torch.Tensor) -> list[Any]:
        """Latents -> PIL images, as KolorsPipeline does it (its VAE may be kept in fp32 here)."""
        vae = pipe.vae
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        latents = latents / vae.config.scaling_factor
        height, width = (8 * n for n in latents.shape[-2:])
        if width * height > TILED_DECODE_ABOVE:
            if hasattr(vae, "_hf_hook"):  # offloaded: `decode` would bring the VAE over, do it here
                vae._hf_hook.pre_forward(vae)
            parts = [vae.tiled_decode(latents[i : i + 1], return_dict=False)[0] for i in range(len(latents))]
            image = torch.cat(parts)
        elif self.decode_one_by_one:
            parts = [vae.decode(latents[i : i + 1], return_dict=False)[0] for i in range(len(latents))]
            image = torch.cat(parts)
        else:
            image = vae.decode(latents, return_dict=False)[0]
        return list(pipe.image_processor.postprocess(image, output_type="pil"))
