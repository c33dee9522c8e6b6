"""Image decoders GILL can condition: which diffusers pipelines, what conditioning each takes, and that
conditioning computed by the decoder pipeline's own `encode_prompt` (never re-implemented here).

| family | diffusers pipeline | conditioning GILL's mapper produces |
|---|---|---|
| `stable-diffusion` | `StableDiffusionPipeline` (SD 1.x, 2.x) | `prompt_embeds` (77 x 768 / 1024) |
| `stable-diffusion-xl` | `StableDiffusionXLPipeline` | `prompt_embeds` (77 x 2048, two encoders) + `pooled_prompt_embeds` (1280) |
| `stable-diffusion-3` | `StableDiffusion3Pipeline` | `prompt_embeds` (77 CLIP + 256 T5 tokens x 4096) + `pooled_prompt_embeds` (2048) |

A decoder's spec (`decoder_spec`) is read off its own encoding of `""`, so a checkpoint with other
sizes (SD 2.x, a distilled SDXL, a shorter T5 length) needs no table entry.
"""

from __future__ import annotations

import os

import torch

from .modeling.configuration_gill import DECODER_FAMILIES

PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
    "StableDiffusion3Pipeline": "stable-diffusion-3",
}
FAMILY_PIPELINES = {family: name for name, family in PIPELINE_FAMILIES.items()}
# What `encode_prompt` needs; the rest of a decoder (denoiser, VAE) is not loaded to make targets.
TEXT_COMPONENTS = {
    "stable-diffusion": ("text_encoder", "tokenizer"),
    "stable-diffusion-xl": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "stable-diffusion-3": ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
}
IMAGE_COMPONENTS = {"stable-diffusion": ("unet", "vae"), "stable-diffusion-xl": ("unet", "vae"), "stable-diffusion-3": ("transformer", "vae")}
assert set(FAMILY_PIPELINES) == set(DECODER_FAMILIES)


def _model_index(decoder: str | os.PathLike) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(os.fspath(decoder))
    except (OSError, ValueError) as error:
        raise ValueError(f"{os.fspath(decoder)!r} is not a diffusers pipeline folder or repo (no readable model_index.json): {error}") from error


def decoder_family(decoder) -> str:
    """The family of a decoder: a diffusers pipeline object, or a pipeline folder / repo id (read from
    its `model_index.json`). An unsupported pipeline is a `ValueError` naming what it is."""
    if isinstance(decoder, (str, os.PathLike)):
        name, where = _model_index(decoder).get("_class_name"), repr(os.fspath(decoder))
    else:
        name, where = type(decoder).__name__, "the pipeline"
    if name not in PIPELINE_FAMILIES:
        raise ValueError(f"{where} is a {name!r}; GILL decodes with {sorted(PIPELINE_FAMILIES)} (a text-to-image pipeline "
                         "conditioned on `prompt_embeds`).")
    return PIPELINE_FAMILIES[name]


def load_decoder(decoder: str | os.PathLike, text_only: bool = False, **kwargs):
    """The decoder's diffusers pipeline from a folder or repo id; `text_only` skips its denoiser and VAE
    (all that `encode_prompt` needs)."""
    import diffusers

    family = decoder_family(decoder)
    index = _model_index(decoder)
    present = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
    needed = TEXT_COMPONENTS[family] + (() if text_only else IMAGE_COMPONENTS[family])
    missing = [c for c in needed if c not in present and c != "text_encoder_3"]  # SD3 runs without T5 (zeros)
    if missing:
        raise ValueError(f"{os.fspath(decoder)!r} ({index.get('_class_name')}) lacks {missing}: GILL needs the decoder's text "
                         "encoders (targets, the unconditional embedding)" + ("" if text_only else " and its denoiser and VAE") + ".")
    skip = {name: None for name in IMAGE_COMPONENTS[family]} if text_only else {}
    if text_only and family == "stable-diffusion":
        skip.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return getattr(diffusers, FAMILY_PIPELINES[family]).from_pretrained(os.fspath(decoder), **{**skip, **kwargs})


@torch.no_grad()
def encode_conditioning(decoder, captions: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(conditioning of `captions`, the decoder's unconditional conditioning), each `{name: tensor}`, from
    the decoder pipeline's own `encode_prompt` (its negative for an absent negative prompt: SDXL's
    zeros under `force_zeros_for_empty_prompt`, SD3's encoding of `""`)."""
    family = decoder_family(decoder)
    captions = [captions] if isinstance(captions, str) else list(captions)
    device = decoder._execution_device
    if family == "stable-diffusion":
        positive, negative = decoder.encode_prompt(captions, device, 1, True, None)
        return {"prompt_embeds": positive}, {"prompt_embeds": negative[:1]}
    extra = {"prompt_3": None} if family == "stable-diffusion-3" else {}
    positive, negative, pooled, negative_pooled = decoder.encode_prompt(
        prompt=captions, prompt_2=None, **extra, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=None)
    return ({"prompt_embeds": positive, "pooled_prompt_embeds": pooled},
            {"prompt_embeds": negative[:1], "pooled_prompt_embeds": negative_pooled[:1]})


def decoder_spec(decoder) -> dict:
    """`{"family", "tensors": {name: shape}}` of a decoder (pipeline object, folder or repo id), as
    `GillConfig.decoder_spec` states it; read off the decoder's encoding of `""`."""
    if isinstance(decoder, (str, os.PathLike)):
        decoder = load_decoder(decoder, text_only=True)
    conditioning, _ = encode_conditioning(decoder, [""])
    return {"family": decoder_family(decoder), "tensors": {k: list(v.shape[1:]) for k, v in conditioning.items()}}


def decoder_config_kwargs(decoder) -> dict:
    """The `GillConfig` fields of a decoder's spec (for fresh heads: `from_pretrained_backbones(...,
    **decoder_config_kwargs(folder))`)."""
    spec = decoder_spec(decoder)
    (tokens, width), pooled = spec["tensors"]["prompt_embeds"], spec["tensors"].get("pooled_prompt_embeds")
    return {"decoder_family": spec["family"], "num_clip_tokens": tokens, "gen_emb_dim": width,
            "pooled_emb_dim": pooled[0] if pooled else None}


__all__ = ["FAMILY_PIPELINES", "PIPELINE_FAMILIES", "TEXT_COMPONENTS", "decoder_config_kwargs", "decoder_family", "decoder_spec",
           "encode_conditioning", "load_decoder"]
