"""GILL pipelines for decoders beyond SD 1.x/2.x: SDXL (`GillXLPipeline`) and SD3 (`GillSD3Pipeline`).

Everything GILL does (decoding the answer, retrieval, the decision, re-scoring, the output) is
`GillPipeline`'s; only the image step differs. Each class runs it through the decoder's own diffusers
pipeline, built around the very same component objects, so that SDXL's micro-conditioning
(`add_time_ids` from the original / target size and crop), SD3's flow-matching loop and each family's
guidance rule are diffusers' code, not a copy of it: given the same conditioning and seed, a GILL
image equals the decoder pipeline's image bit for bit. The initial noise is drawn per block from its
prompt's generator, as in `GillPipeline`, so a batch equals its prompts run alone.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging

from gill_hf.modeling import GillForConditionalGeneration
from gill_hf.processing_gill import GillProcessor
from gill_hf.retrieval import GillRetrievalIndex

from .components_gill import GillUnconditionalEmbedding, ImageBlock
from .pipeline_gill import GillPipeline

logger = logging.get_logger(__name__)


class _DecoderPipelineImages(GillPipeline):
    """The image step through the decoder's own pipeline (`decoder_class`), for decoders whose
    conditioning is a token sequence plus a pooled vector."""

    decoder_class: type
    _decoder_components: tuple[str, ...]  # this pipeline's components that the decoder pipeline takes
    _decoder_options: dict = {}

    def decoder_pipeline(self):
        """The decoder's diffusers pipeline over this pipeline's own component objects (no copy)."""
        decoder = self.decoder_class(**{name: getattr(self, name, None) for name in self._decoder_components}, **self._decoder_options)
        decoder.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return decoder

    def encode_negative_prompt(self, negative_prompt, negative_prompt_embeds, device, dtype,
                               negative_pooled_prompt_embeds=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative sequence, negative pooled vector): given tensors, the decoder's encoding of
        `negative_prompt`, the stored unconditional conditioning, or zeros (SDXL's
        `force_zeros_for_empty_prompt`) when none of those is present."""
        config = self.gill_model.config
        if (negative_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
            raise ValueError("Pass `negative_prompt_embeds` and `negative_pooled_prompt_embeds` together.")
        if negative_prompt_embeds is not None:
            embeds, pooled = negative_prompt_embeds, negative_pooled_prompt_embeds
        elif negative_prompt is not None:
            from gill_hf.decoders import encode_conditioning

            conditioning, _ = encode_conditioning(self.decoder_pipeline(), [negative_prompt])
            embeds, pooled = conditioning["prompt_embeds"], conditioning["pooled_prompt_embeds"]
        elif self.unconditional_embedding is not None:
            embeds, pooled = self.unconditional_embedding.embeds, self.unconditional_embedding.pooled_embeds
        else:
            logger.warning_once("The pipeline has no `unconditional_embedding`: classifier-free guidance uses zeros as the "
                                "unconditional conditioning (pass `negative_prompt_embeds` to choose).")
            embeds, pooled = torch.zeros(1, config.num_clip_tokens, config.gen_emb_dim), torch.zeros(1, config.pooled_emb_dim)
        if embeds.ndim != 3 or embeds.shape[1:] != (config.num_clip_tokens, config.gen_emb_dim):
            raise ValueError(f"`negative_prompt_embeds` must be (n, {config.num_clip_tokens}, {config.gen_emb_dim}), got {tuple(embeds.shape)}.")
        if pooled is None or pooled.ndim != 2 or pooled.shape[1] != config.pooled_emb_dim or pooled.shape[0] != embeds.shape[0]:
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"`negative_pooled_prompt_embeds` must be ({embeds.shape[0]}, {config.pooled_emb_dim}), got {got}.")
        return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    def _generate_images(
        self, blocks: list[ImageBlock], generators, num_images_per_prompt, height, width, num_inference_steps, guidance_scale,
        negative_prompt, negative_prompt_embeds, latents, callback_on_step_end, callback_tensor_inputs, device, decode=True,
        negative_pooled_prompt_embeds=None,
    ) -> torch.Tensor:
        dtype = self.denoiser.dtype
        rows = len(blocks) * num_images_per_prompt
        prompt_embeds = torch.stack([b.prompt_embeds for b in blocks]).to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
        pooled = torch.stack([b.pooled_prompt_embeds for b in blocks]).to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
        negative, negative_pooled = self.encode_negative_prompt(negative_prompt, negative_prompt_embeds, device, dtype,
                                                                negative_pooled_prompt_embeds)
        if negative.shape[0] not in (1, rows):
            raise ValueError(f"`negative_prompt_embeds` holds {negative.shape[0]} embeddings; expected 1 or one per generated image ({rows}).")
        noise = self.prepare_latents(blocks, generators, num_images_per_prompt, height, width, dtype, device, latents, scale=False)
        row_generators = [generators[b.prompt] for b in blocks for _ in range(num_images_per_prompt)]
        decoder = self.decoder_pipeline()

        def relay(pipeline, step, timestep, callback_kwargs):  # the user's callback sees the GILL pipeline
            outputs = callback_on_step_end(self, step, timestep, callback_kwargs)
            pipeline._guidance_scale = self._guidance_scale  # a callback may change the guidance, as in diffusers
            if "latents" in outputs and not torch.isfinite(outputs["latents"]).all():
                raise ValueError(f"`callback_on_step_end` returned latents with NaN or infinite values at step {step}.")
            return outputs

        images = decoder(
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative.expand(rows, -1, -1),
            negative_pooled_prompt_embeds=negative_pooled.expand(rows, -1), height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=noise,
            generator=row_generators if all(g is not None for g in row_generators) else None,
            output_type="pt" if decode else "latent", return_dict=False,
            callback_on_step_end=relay if callback_on_step_end is not None else None,
            callback_on_step_end_tensor_inputs=callback_tensor_inputs,
        )[0]
        self._num_timesteps = decoder.num_timesteps
        return images


class GillXLPipeline(_DecoderPipelineImages):
    r"""
    GILL with a Stable Diffusion XL decoder: the mapper's heads give SDXL's `prompt_embeds` (77 x 2048,
    its two text encoders' states) and `pooled_prompt_embeds` (1280); SDXL's micro-conditioning
    (`add_time_ids`) follows `height` / `width` as in `StableDiffusionXLPipeline`. Same call,
    outputs and save / load / hub round trip as [`GillPipeline`].

    Args:
        gill_model, processor, retrieval_index, unconditional_embedding: as in [`GillPipeline`].
        vae, unet, scheduler: SDXL's.
        text_encoder, text_encoder_2, tokenizer, tokenizer_2 (*optional*): SDXL's, for `negative_prompt`.
    """

    decoder_family = "stable-diffusion-xl"
    decoder_class = StableDiffusionXLPipeline
    _decoder_components = ("vae", "unet", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    _decoder_options = {"add_watermarker": False}  # GILL's images are not watermarked (invisible-watermark is not a dependency)
    model_cpu_offload_seq = "gill_model->text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "retrieval_index", "unconditional_embedding"]
    _exclude_from_cpu_offload = ["retrieval_index", "unconditional_embedding"]
    _callback_tensor_inputs = StableDiffusionXLPipeline._callback_tensor_inputs

    def __init__(
        self,
        gill_model: GillForConditionalGeneration,
        processor: GillProcessor,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        retrieval_index: GillRetrievalIndex | None = None,
        unconditional_embedding: GillUnconditionalEmbedding | None = None,
        default_num_inference_steps: int = 50,
        default_guidance_scale: float = 5.0,
    ):
        super(GillPipeline, self).__init__()
        if unet is not None and gill_model is not None:
            config, expected = gill_model.config, unet.config.projection_class_embeddings_input_dim
            time_ids = expected - (config.pooled_emb_dim or 0)
            if unet.config.cross_attention_dim != config.gen_emb_dim or time_ids != 6 * unet.config.addition_time_embed_dim:
                raise ValueError(f"The SDXL UNet takes {unet.config.cross_attention_dim}-wide states and a {expected}-wide added "
                                 f"embedding; the GILL model gives {config.gen_emb_dim}-wide states and a {config.pooled_emb_dim}-wide "
                                 "pooled vector.")
        self._register_gill_components(
            gill_model, retrieval_index, default_num_inference_steps, default_guidance_scale,
            processor=processor, vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unconditional_embedding=unconditional_embedding,
        )


class GillSD3Pipeline(_DecoderPipelineImages):
    r"""
    GILL with a Stable Diffusion 3 decoder (an MMDiT transformer, flow matching): the mapper's heads give
    SD3's `prompt_embeds` (its two CLIPs' and T5's tokens, 77 + 256 x 4096 by default) and
    `pooled_prompt_embeds` (2048). Same call, outputs and save / load / hub round trip as
    [`GillPipeline`].

    Args:
        gill_model, processor, retrieval_index, unconditional_embedding: as in [`GillPipeline`].
        vae, transformer, scheduler: SD3's.
        text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3 (*optional*):
            SD3's, for `negative_prompt`.
    """

    decoder_family = "stable-diffusion-3"
    decoder_class = StableDiffusion3Pipeline
    _decoder_components = ("vae", "transformer", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                           "tokenizer_2", "tokenizer_3")
    model_cpu_offload_seq = "gill_model->text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
                            "retrieval_index", "unconditional_embedding"]
    _exclude_from_cpu_offload = ["retrieval_index", "unconditional_embedding"]
    _callback_tensor_inputs = StableDiffusion3Pipeline._callback_tensor_inputs

    def __init__(
        self,
        gill_model: GillForConditionalGeneration,
        processor: GillProcessor,
        vae: AutoencoderKL,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder=None,
        text_encoder_2=None,
        text_encoder_3=None,
        tokenizer=None,
        tokenizer_2=None,
        tokenizer_3=None,
        retrieval_index: GillRetrievalIndex | None = None,
        unconditional_embedding: GillUnconditionalEmbedding | None = None,
        default_num_inference_steps: int = 28,
        default_guidance_scale: float = 7.0,
    ):
        super(GillPipeline, self).__init__()
        if transformer is not None and gill_model is not None:
            config = gill_model.config
            if (transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim) != (config.gen_emb_dim, config.pooled_emb_dim):
                raise ValueError(f"The SD3 transformer takes {transformer.config.joint_attention_dim}-wide states and a "
                                 f"{transformer.config.pooled_projection_dim}-wide pooled vector; the GILL model gives "
                                 f"{config.gen_emb_dim} and {config.pooled_emb_dim}.")
        self._register_gill_components(
            gill_model, retrieval_index, default_num_inference_steps, default_guidance_scale,
            processor=processor, vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
            text_encoder_2=text_encoder_2, text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            tokenizer_3=tokenizer_3, unconditional_embedding=unconditional_embedding,
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer


__all__ = ["GillSD3Pipeline", "GillXLPipeline"]
