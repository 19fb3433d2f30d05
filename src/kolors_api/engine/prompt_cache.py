"""An LRU cache of prompt embeddings: ChatGLM is the largest part of Kolors, and the same prompts
(the empty negative prompt above all) come back again and again.

Entries are the text encoder's output for one prompt (and its negative prompt when guidance is on),
exactly as `KolorsPipeline.encode_prompt` computes them for one image, kept on the device; the
cache holds at most `max_bytes` of them. `STATS` counts hits and misses of every cache in the
process (`kolors_prompt_cache_*` in /metrics).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

#: Hits and misses of all the process's caches, read by the worker's /metrics.
STATS = {"hits": 0, "misses": 0}


@dataclass(frozen=True)
class PromptEmbeds:
    """The four tensors `KolorsPipeline` takes for one image (negatives None without guidance)."""

    prompt: torch.Tensor  # [1, tokens, hidden]
    pooled: torch.Tensor  # [1, hidden]
    negative: torch.Tensor | None
    negative_pooled: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        tensors = (self.prompt, self.pooled, self.negative, self.negative_pooled)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def pipeline_kwargs(self, images: int) -> dict[str, Any]:
        """The pipeline's embedding arguments for `images` images of this prompt (call it with
        `num_images_per_prompt=1`: the rows are repeated here)."""
        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(images, *[1] * (t.ndim - 1))

        return {"prompt_embeds": rows(self.prompt), "pooled_prompt_embeds": rows(self.pooled),
                "negative_prompt_embeds": rows(self.negative),
                "negative_pooled_prompt_embeds": rows(self.negative_pooled)}


class PromptCache:
    """`encode(pipe, prompt, negative, ...)` -> `PromptEmbeds`, from the cache when it holds them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lock = threading.Lock()  # concurrent `generate` calls share one engine's cache
        self._entries: OrderedDict[tuple[str, str | None, int], PromptEmbeds] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, pipe: Any, prompt: str, negative: str | None, *, device: Any,
               max_sequence_length: int) -> PromptEmbeds:
        """Embeddings of `prompt` and, when `negative` is not None (guidance on), of `negative`."""
        key = (prompt, negative, max_sequence_length)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                STATS["hits"] += 1
                return cached
            STATS["misses"] += 1
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=negative is not None, negative_prompt=negative,
            max_sequence_length=max_sequence_length)
        embeds = PromptEmbeds(prompt_embeds, pooled, negative_embeds, negative_pooled)
        if embeds.nbytes <= self.max_bytes:
            with self._lock:
                if key not in self._entries:  # another call may have encoded it meanwhile
                    self._entries[key] = embeds
                    self.bytes += embeds.nbytes
                while self.bytes > self.max_bytes:
                    _, dropped = self._entries.popitem(last=False)
                    self.bytes -= dropped.nbytes
        return embeds
