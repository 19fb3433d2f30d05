"""The img2img peer that batches: LitServe around the stock KolorsImg2ImgPipeline, as bench/litserve_peer.py
is around KolorsPipeline (the same batching, answers and command line). bench/img2img.py runs it on the
same weights as our server and sends it the same requests.

    .venv/bin/python bench/litserve_img2img_peer.py --model PATH --port 8012 --max-batch-size 8
    POST /predict {"prompt", "seed", "width", "height", "steps", "strength", "image": base64}
         -> {"image": base64 webp, "batch": the size of the batch it was made in}
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run time.
import base64
import io
import sys
from pathlib import Path
from typing import Any

import torch
from diffusers import KolorsImg2ImgPipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litserve_peer import KolorsAPI, main  # noqa: E402  (bench/ is not a package)


class Img2ImgAPI(KolorsAPI):
    def setup(self, device: str) -> None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.pipe = KolorsImg2ImgPipeline.from_pretrained(self.model, torch_dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device_name = device

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        image = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")
        return {**request, "image": image.resize((request["width"], request["height"]))}

    def predict(self, batch: list[dict[str, Any]]) -> list[Any]:
        # one pipeline call for the batch (the bench sends one shape and strength), a generator per image
        first = batch[0]
        images = self.pipe(
            prompt=[r["prompt"] for r in batch], image=[r["image"] for r in batch], strength=first["strength"],
            guidance_scale=first.get("cfg", 5.0), num_inference_steps=first["steps"], width=first["width"],
            height=first["height"],
            generator=[torch.Generator(self.device_name).manual_seed(r["seed"]) for r in batch]).images
        return [(image, len(batch)) for image in images]  # the batch size goes back for bench/load.py


if __name__ == "__main__":
    main(Img2ImgAPI, port=8012)
