"""Output types of `GillForConditionalGeneration`: the training forward's losses and tensors, and a
decoding step's logits and cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput


@dataclass
class GillOutput(ModelOutput):
    r"""
    Output of the GILL training forward. The losses are unscaled; `loss` is their weighted sum.

    Args:
        loss: `caption_loss + text_loss + contrastive_loss + gen_loss`, each times its config scale.
        caption_loss: next-token CE of the caption given the image's visual prefix.
        text_loss: next-token CE of the text pass (caption + `[IMG0]`; `[IMG1..]` masked).
        contrastive_loss: symmetric InfoNCE between image and `[IMG0]` retrieval embeddings.
        gen_loss: mean over examples and positions of the per-token L2 distance between the mapper
            output and `gen_targets`, plus (decoders with a pooled vector) `pooled_loss_scale` times
            `gen_pooled_loss`.
        gen_pooled_loss: mean L2 distance between the pooled head's output and `gen_pooled_targets`.
        caption_logits / caption_labels: the captioning pass (visual prefix included in the labels as -100).
        text_logits / text_labels: the text pass.
        img_hidden_states: `(batch, num_img_tokens, hidden)` LM states at the `[IMG]` positions.
        text_embeds / image_embeds: L2-normalised retrieval embeddings, `(batch, ret_emb_dim)`.
        logits_per_image: `exp(logit_scale) * image_embeds @ text_embeds.T` over the (gathered) batch.
        prompt_embeds: `(batch, num_clip_tokens, gen_emb_dim)` mapper output.
        pooled_prompt_embeds: `(batch, pooled_emb_dim)` pooled head output (decoders with a pooled vector).
    """

    loss: torch.FloatTensor | None = None
    caption_loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    gen_loss: torch.FloatTensor | None = None
    gen_pooled_loss: torch.FloatTensor | None = None
    caption_logits: torch.FloatTensor | None = None
    caption_labels: torch.LongTensor | None = None
    text_logits: torch.FloatTensor | None = None
    text_labels: torch.LongTensor | None = None
    img_hidden_states: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    prompt_embeds: torch.FloatTensor | None = None
    pooled_prompt_embeds: torch.FloatTensor | None = None


@dataclass
class GillCausalLMOutputWithPast(ModelOutput):
    r"""
    Output of a decoding forward (a prompt or a cached step).

    Args:
        logits: `(batch, seq, logits_width)`; `[IMG]` columns come from GILL's own rows, columns no
            row stands behind are `-inf`.
        cache: the LM's KV cache.
        hidden_states: the LM's hidden states, when requested.
        attentions: the LM's attentions, when requested.
    """

    logits: torch.FloatTensor | None = None
    cache: Any | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


__all__ = ["GillCausalLMOutputWithPast", "GillOutput"]
