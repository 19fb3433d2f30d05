"""The engine's flags of `serve` and `worker`, and `kolors-api random-model`."""

from __future__ import annotations

import argparse
import json

#: `--dtype` (the setting `dtype`; the names of `kolors_api.engine._util.DTYPES`, which imports torch).
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")


def setting_help(text: str, name: str, default: str) -> str:
    """A flag's help: what it does, its default and the env var of the same setting."""
    return f"{text} (default {default}; env KOLORS_API_{name.upper()})"


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """`--dtype`, `--compile`, `--compile-shapes`, `--compile-batches`, `--compile-cache`, `--vae`, `--ip-adapter`,
    `--offload`,
    `--max-batch-images`, `--max-batch-megapixels`, `--batch-wait-ms` (settings of the same names)."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help=setting_help("weights' dtype", "dtype", "auto: float16 on CUDA, float32 on CPU"))
    p.add_argument("--compile", action="store_true", default=None,
                   help=setting_help("torch.compile the UNet, compiled at start for --compile-shapes", "compile",
                                     "off"))
    p.add_argument("--compile-shapes", dest="compile_shapes", metavar="WxH[,WxH...]",
                   help=setting_help("shapes compiled at start; others compile on first use", "compile_shapes",
                                     "1024x1024"))
    p.add_argument("--compile-batches", dest="compile_batches", choices=("pad", "dynamic"),
                   help=setting_help("how the compiled UNet meets batch sizes: pad each call to 1/2/4/8/16 rows, "
                                     "all compiled at start, or one dynamic-shape graph", "compile_batches", "pad"))
    p.add_argument("--compile-cache", dest="compile_cache", metavar="DIR",
                   help=setting_help("compiled kernels kept here across restarts", "compile_cache",
                                     "DATA_DIR/compile-cache"))
    p.add_argument("--vae", help=setting_help("another VAE, a diffusers folder or repo id; an fp16-safe one "
                                              "decodes in fp16", "vae", "the model's own"))
    p.add_argument("--ip-adapter", dest="ip_adapter", metavar="REPO|PATH|tiny",
                   help=setting_help("the Kolors IP-Adapter-Plus (ip_adapter_image, ip_adapter_scale): a repo id "
                                     "such as Kwai-Kolors/Kolors-IP-Adapter-Plus, a folder of its layout, or tiny "
                                     "(with --model tiny, built offline); give it to API replicas too",
                                     "ip_adapter", "none"))
    p.add_argument("--offload", action="store_true", default=None,
                   help=setting_help("model CPU offload for cards of about 16 GB; slower", "offload", "off"))
    p.add_argument("--max-batch-images", dest="max_batch_images", type=int, metavar="N",
                   help=setting_help("images per engine call: queued jobs of one shape run together; 1 = off",
                                     "max_batch_images", "0: sized for the device"))
    p.add_argument("--max-batch-megapixels", dest="max_batch_megapixels", type=float, metavar="MP",
                   help=setting_help("images x pixels per engine call, in millions", "max_batch_megapixels",
                                     "0: sized for the device"))
    p.add_argument("--batch-wait-ms", dest="batch_wait_ms", type=int, metavar="MS",
                   help=setting_help("how long a job waits for company of its shape before its call starts: "
                                     "-1 auto (an idle worker waits a fraction of a step, longer while jobs "
                                     "keep coming), 0 never, N up to N ms", "batch_wait_ms", "-1: auto"))


def add_random_model_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`kolors-api random-model --size full --device cuda`: build a random-weight pipeline in memory."""
    r = sub.add_parser("random-model", help="build a random-weight Kolors pipeline in memory and report it",
                       description="Builds the pipeline that --model random:SIZE serves (no files are written) "
                                   "and prints its parameters, build time and memory as JSON. small: the tiny "
                                   "model's shapes; full: Kwai-Kolors/Kolors-diffusers' (about 8.9 B parameters, "
                                   "17.8 GB in float16).")
    r.add_argument("--size", choices=("small", "full"), default="small", help="default small")
    r.add_argument("--device", help=setting_help("torch device", "device", "cuda if present, else cpu"))
    r.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help=setting_help("weights' dtype", "dtype", "auto: float16 on CUDA, float32 on CPU"))
    r.set_defaults(func=cmd_random_model)


def cmd_random_model(args: argparse.Namespace) -> int:
    from kolors_api.engine.random_weights import build_report
    from kolors_api.settings import Settings

    settings = Settings(**{k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None})
    print(json.dumps(build_report(args.size, device=settings.device, dtype=settings.dtype), indent=2))
    return 0
