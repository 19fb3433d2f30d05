"""The peer that batches: a LitServe server around the stock KolorsPipeline, as LitServe's docs write
one (dynamic batching: `max_batch_size`, `batch_timeout`). bench/generation.py runs it on the same
weights as our server and sends it the same requests.

    .venv/bin/python bench/litserve_peer.py --model PATH --port 8011 --max-batch-size 8
    POST /predict {"prompt": "...", "seed": 1, "width": 512, "height": 512, "steps": 20}
         -> {"image": base64 webp, "batch": the size of the batch it was made in}
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run time.
import argparse
import base64
import io
from typing import Any

import litserve as ls
import torch
from diffusers import KolorsPipeline


class KolorsAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, model: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    def setup(self, device: str) -> None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        if self.model.startswith("random:"):  # the real model's shapes, random weights (bench/gpu.sh)
            from kolors_api.engine.random_weights import build_random_pipeline

            self.pipe = build_random_pipeline(self.model.removeprefix("random:"), device=device, dtype=dtype)
        else:
            self.pipe = KolorsPipeline.from_pretrained(self.model, torch_dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device_name = device

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return request

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return inputs

    def predict(self, batch: list[dict[str, Any]]) -> list[Any]:
        # one pipeline call for the batch (same shape: the bench sends one shape), a generator per image
        first = batch[0]
        images = self.pipe(
            prompt=[r["prompt"] for r in batch], negative_prompt=[r.get("negative_prompt", "") for r in batch],
            guidance_scale=first.get("cfg", 5.0), num_inference_steps=first["steps"], width=first["width"],
            height=first["height"],
            generator=[torch.Generator(self.device_name).manual_seed(r["seed"]) for r in batch]).images
        return [(image, len(batch)) for image in images]  # the batch size goes back for bench/load.py

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        image, batch = output
        buf = io.BytesIO()
        image.save(buf, format="WEBP", quality=80)
        return {"image": base64.b64encode(buf.getvalue()).decode(), "batch": batch}


def main(api_class: type[ls.LitAPI] = KolorsAPI, port: int = 8011) -> None:
    """Run `api_class` (bench/litserve_img2img_peer.py passes its img2img one) under LitServe."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=port)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-timeout", type=float, default=0.05)
    args = ap.parse_args()
    api = api_class(args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="auto", timeout=600)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
