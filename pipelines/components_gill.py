"""The pieces of a GILL pipeline besides the pipeline classes: its output, the stored unconditional
conditioning, one [IMG] block's state during a call, and variant loading."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

@dataclass
class GillPipelineOutput(BaseOutput):
    r"""
    Output of [`GillPipeline`]; every field holds one entry per prompt.

    Args:
        text: the answer, with `<image>` where each `[IMG]` block stood.
        images: per block (x `num_images_per_prompt`), in `output_type` form.
        image_sources: `"generated"` / `"retrieved"` per image.
        token_ids: generated ids only (prompt excluded).
        prompt_embeds: `(n_blocks, num_clip_tokens, gen_emb_dim)`, for every block.
        pooled_prompt_embeds: `(n_blocks, pooled_emb_dim)` for decoders with a pooled vector (SDXL, SD3); else None.
        retrieval_scores / retrieval_indices: `(n_blocks, k)` cosine similarities (unscaled) and index
            positions; None without a retrieval index.
        generated_scores: `(n_blocks, num_images_per_prompt)` cosine of each generated image's retrieval
            embedding to its block's (NaN for blocks that retrieved); None without an image head.
        decision_probs: `(n_blocks, 2)`, column 0 = generate, 1 = retrieve; None when no decision was made.
    """

    text: list[str]
    images: list[list[Any]]
    image_sources: list[list[str]]
    token_ids: list[list[int]]
    prompt_embeds: list[torch.Tensor]
    retrieval_scores: list[torch.Tensor] | None
    retrieval_indices: list[torch.Tensor] | None
    generated_scores: list[torch.Tensor] | None
    decision_probs: list[torch.Tensor] | None
    pooled_prompt_embeds: list[torch.Tensor] | None = None


class GillUnconditionalEmbedding(ModelMixin, ConfigMixin):
    """The image decoder's unconditional conditioning (its own negative for an empty prompt: SD's
    encoding of `""`, SDXL's zeros, ...), one tensor per decoder-spec entry, stored so that a pipeline
    needs no decoder text encoder at inference."""

    @register_to_config
    def __init__(self, num_tokens: int = 77, embedding_dim: int = 768, pooled_dim: int | None = None):
        super().__init__()
        self.embeds = torch.nn.Parameter(torch.zeros(1, num_tokens, embedding_dim), requires_grad=False)
        self.pooled_embeds = torch.nn.Parameter(torch.zeros(1, pooled_dim), requires_grad=False) if pooled_dim else None

    @classmethod
    def from_tensors(cls, conditioning: dict[str, torch.Tensor]) -> GillUnconditionalEmbedding:
        """From `{"prompt_embeds": (1, L, D)[, "pooled_prompt_embeds": (1, P)]}`."""
        embeds, pooled = conditioning["prompt_embeds"], conditioning.get("pooled_prompt_embeds")
        stored = cls(num_tokens=embeds.shape[1], embedding_dim=embeds.shape[2], pooled_dim=None if pooled is None else pooled.shape[-1])
        stored.embeds.data.copy_(embeds[:1].float())
        if pooled is not None:
            stored.pooled_embeds.data.copy_(pooled[:1].float())
        return stored


def variant_components(cls, folder: str | os.PathLike, kwargs: dict) -> dict:
    """With `variant`, the components whose folders hold that variant's files, loaded with it (the
    others load plain); diffusers' own variant scan cannot read folders such as `lora/` or `dataset/`.
    Pops `variant` from `kwargs`."""
    variant = kwargs.pop("variant", None)
    if variant is None:
        return {}
    import importlib

    index = cls.load_config(folder)  # as the pipeline class reads it (a remote-code folder's entries mapped)
    loaded = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or name in kwargs:
            continue
        subfolder = Path(folder) / name
        if not subfolder.is_dir() or not any(f".{variant}." in p.name for p in subfolder.iterdir()):
            continue
        component_cls = getattr(importlib.import_module(spec[0]), spec[1])
        dtype = {k: kwargs[k] for k in ("dtype", "torch_dtype") if k in kwargs}
        loaded[name] = component_cls.from_pretrained(str(subfolder), variant=variant, **dtype)
    if not loaded:
        raise ValueError(f"`variant={variant!r}`: no component of {os.fspath(folder)!r} has files of that variant.")
    return loaded


@dataclass
class ImageBlock:
    """One [IMG] block of an answer during a call: its states, conditioning, retrieval and images."""

    prompt: int
    hidden: torch.Tensor  # (num_img_tokens, hidden)
    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    source: str = "generated"
    scores: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    decision: torch.Tensor | None = None
    images: list = None
    generated_scores: torch.Tensor | None = None


__all__ = ["GillPipelineOutput", "GillUnconditionalEmbedding", "ImageBlock", "variant_components"]
