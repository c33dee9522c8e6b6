"""GillPipeline: interleaved images and text in; text, generated and retrieved images out.

The GILL model decodes an answer (KV-cached, GILL's rules in `decoding_gill`); each `[IMG]` block
gives a retrieval embedding, a retrieve-or-generate decision and, through the mapper, Stable
Diffusion `prompt_embeds` that the UNet/VAE turn into images.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from gill_hf.modeling import GillForConditionalGeneration
from gill_hf.modeling.checkpoint_forms import default_form
from gill_hf.modeling.manifest import load_consistently, save_folder
from gill_hf.processing_gill import GillProcessor
from gill_hf.retrieval import GillRetrievalIndex

from .components_gill import GillPipelineOutput, GillUnconditionalEmbedding, ImageBlock, variant_components
from .decoding_gill import DECODING_MODES, DecodedRow, GillDecodingOptions, GillTokenIds, answer_text, gill_decode
from .utils_gill import convert_image, encode_text, own_unaligned_memory

logger = logging.get_logger(__name__)

IMAGE_SOURCES = ("auto", "generated", "retrieved")
PIPELINE_MODULE = "pipeline_gill"  # the module file a saved folder names beside the class
# The module file each GILL component's folder holds in the remote-code form (`gill_hf.remote_code`).
REMOTE_CODE_MODULES = {"gill_model": "modeling_gill_remote", "processor": "processing_gill", "retrieval_index": "retrieval",
                       "unconditional_embedding": "components_gill"}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _saved_pipeline_class(folder: str | os.PathLike) -> type | None:
    """The GILL pipeline class a saved folder's `model_index.json` names, or None."""
    index = Path(folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    name = name[1] if isinstance(name, (list, tuple)) else name
    classes, pending = {}, [GillPipeline]
    while pending:  # GillPipeline and its subclasses, breadth first: on a name clash the package's class wins
        cls = pending.pop(0)
        classes.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    return classes.get(name) if isinstance(name, str) else None


class GillPipeline(DiffusionPipeline, StableDiffusionMixin):
    r"""
    GILL (Koh et al., 2023) as a diffusers pipeline.

    Args:
        gill_model ([`GillForConditionalGeneration`]): the multimodal LM with GILL's heads.
        processor ([`GillProcessor`]): tokenizer + CLIP image processor of `gill_model`.
        vae ([`AutoencoderKL`]), unet ([`UNet2DConditionModel`]), scheduler: the Stable Diffusion
            image decoder; the UNet's `cross_attention_dim` must equal `gen_emb_dim`.
        text_encoder, tokenizer (*optional*): SD's text encoder, used for `negative_prompt` and to
            compute the unconditional embedding when none is stored.
        safety_checker, feature_extractor (*optional*): as in `StableDiffusionPipeline`.
        retrieval_index ([`GillRetrievalIndex`], *optional*): images to retrieve from.
        unconditional_embedding ([`GillUnconditionalEmbedding`], *optional*): stored SD encoding of `""`.

    Attributes:
        numpy_blas (`bool`, defaults to `True`): on CPU in float32, decode with the model's linear
            layers computed by numpy's BLAS (`cpu_blas_gill`: the same greedy tokens, about twice the
            tokens/s where torch's BLAS is MKL on an AMD CPU) and, for a Llama LM, its cached steps as one
            fused function (`cpu_decode_gill`, about 2x more): for one prompt, one call of a compiled step
            that the system's C compiler builds on first use (`cpu_kernels_gill`; numpy calls and numpy's
            BLAS without a compiler or with `GILL_HF_CPU_KERNELS=0`); `pipe.numpy_blas = False` keeps
            torch's modules and matmuls.
    """

    model_cpu_offload_seq = "gill_model->text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "safety_checker", "feature_extractor", "retrieval_index", "unconditional_embedding"]
    # Read directly, never through forward, so offload hooks would leave them on the meta device.
    _exclude_from_cpu_offload = ["safety_checker", "retrieval_index", "unconditional_embedding"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    decoder_family = "stable-diffusion"

    def __init__(
        self,
        gill_model: GillForConditionalGeneration,
        processor: GillProcessor,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder=None,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        retrieval_index: GillRetrievalIndex | None = None,
        unconditional_embedding: GillUnconditionalEmbedding | None = None,
        default_num_inference_steps: int = 50,
        default_guidance_scale: float = 7.5,
    ):
        super().__init__()
        if unet is not None and gill_model is not None and unet.config.cross_attention_dim != gill_model.config.gen_emb_dim:
            raise ValueError(f"The UNet's cross_attention_dim ({unet.config.cross_attention_dim}) differs from the GILL model's "
                             f"gen_emb_dim ({gill_model.config.gen_emb_dim}).")
        self._register_gill_components(
            gill_model, retrieval_index, default_num_inference_steps, default_guidance_scale,
            processor=processor, vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
            safety_checker=safety_checker, feature_extractor=feature_extractor, unconditional_embedding=unconditional_embedding,
        )

    def _register_gill_components(self, gill_model, retrieval_index, default_num_inference_steps: int,
                                  default_guidance_scale: float, **components) -> None:
        """What every GILL pipeline's `__init__` shares: the checks between the GILL model and its
        decoder / index, registration, the saved call defaults, the VAE image processor."""
        if gill_model is not None and gill_model.config.decoder_family != self.decoder_family:
            raise ValueError(f"The GILL model was trained for a {gill_model.config.decoder_family!r} decoder; "
                             f"{type(self).__name__} decodes with {self.decoder_family!r}.")
        if retrieval_index is not None and gill_model is not None and retrieval_index.config.embedding_dim != gill_model.config.ret_emb_dim:
            raise ValueError(
                f"The retrieval index holds {retrieval_index.config.embedding_dim}-d embeddings, the GILL model's ret_emb_dim is {gill_model.config.ret_emb_dim}."
            )
        self.register_modules(gill_model=gill_model, retrieval_index=retrieval_index, **components)
        # What `num_inference_steps` / `guidance_scale` default to: the decoder's own settings, saved
        # with the pipeline (diffusers' 50 / 7.5 unless the decoder says otherwise).
        self.register_to_config(default_num_inference_steps=default_num_inference_steps,
                                default_guidance_scale=default_guidance_scale)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.numpy_blas = True

    @property
    def denoiser(self) -> torch.nn.Module:
        """The decoder's denoising network (a UNet here, a transformer in SD3-style decoders)."""
        return self.unet

    # ----- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> GillPipeline:
        """Loads a saved pipeline; a repo id is first fetched with `snapshot_download` (diffusers
        cannot resolve GILL's component modules from a repo id), which also works offline from a
        seeded cache. The folder is verified against its `gill_manifest.json` and loaded as one
        saved version (never a mixture of two saves). `variant` loads each component's variant
        files where it has them (the plain files elsewhere). A remote-code folder
        (`gill_hf.remote_code`) loads with this class's own components, running none of its code."""
        if not os.path.isdir(pretrained_model_name_or_path):
            from huggingface_hub import snapshot_download

            hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            pretrained_model_name_or_path = snapshot_download(str(pretrained_model_name_or_path), **hub_kwargs)
        saved = _saved_pipeline_class(pretrained_model_name_or_path)
        if saved is not None and saved is not cls and issubclass(saved, cls):  # e.g. GillPipeline.from_pretrained(an SDXL GILL)
            return saved.from_pretrained(pretrained_model_name_or_path, **kwargs)
        load = super().from_pretrained.__func__

        def load_version(manifest):
            extra = variant_components(cls, pretrained_model_name_or_path, kwargs)
            return load(cls, pretrained_model_name_or_path, **{**kwargs, **extra})

        pipe = load_consistently(pretrained_model_name_or_path, load_version)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                own_unaligned_memory(component)
        return pipe

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`, reading the `[module file, class]` form of `_class_name` that saved
        folders carry (so plain `DiffusionPipeline.from_pretrained` finds this class) as this class. A
        remote-code folder names each GILL component by a code file of its own folder; those entries
        are read as this class's own components, so that none of the folder's code runs."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config, dict) and isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][1]
        if isinstance(config, dict):
            own = {"gill_model": GillForConditionalGeneration, "processor": GillProcessor,
                   "retrieval_index": GillRetrievalIndex, "unconditional_embedding": GillUnconditionalEmbedding}
            for name, component_cls in own.items():
                if list(config.get(name) or []) == [REMOTE_CODE_MODULES[name], component_cls.__name__]:
                    config[name] = [component_cls.__module__, component_cls.__name__]
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Saves every component (diffusers' layout) as one version through the manifest primitive:
        a crash leaves the old pipeline or the new one, never a mixture that loads, and files of
        the folder that are not the pipeline's are never touched. The GILL model is saved in the
        adapter form whenever its backbones have references (not a second copy of the LM).
        `model_index.json` names the class as `["pipeline_gill", "GillPipeline"]` beside a two-line
        `pipeline_gill.py` that imports it, so `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` finds it too."""
        if kwargs.get("push_to_hub"):
            raise ValueError("`push_to_hub=True` is not supported here: call `pipe.push_to_hub(repo_id)` (one commit, with a card).")
        model = self.gill_model
        with save_folder(save_directory) as staging:
            if model is not None:
                model.default_save_form = default_form(model.config)
            try:
                super().save_pretrained(staging, **kwargs)
            finally:
                if model is not None:
                    del model.default_save_form
            index = json.loads((staging / "model_index.json").read_text())
            index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
            (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            (staging / f"{PIPELINE_MODULE}.py").write_text(
                f'"""Loads `{type(self).__name__}` from the installed gill-hf package (pip install gill-hf)."""\n\n'
                f"from gill_hf.pipelines import {type(self).__name__}  # noqa: F401\n"
            )

    @classmethod
    def from_sd_and_gill(
        cls,
        stable_diffusion,
        gill_model: GillForConditionalGeneration,
        processor: GillProcessor,
        retrieval_index: GillRetrievalIndex | None = None,
        keep_text_encoder: bool = False,
        default_num_inference_steps: int = 50,
        default_guidance_scale: float = 7.5,
        **sd_kwargs,
    ) -> GillPipeline:
        r"""
        Assembles a pipeline from an image decoder (a folder, a repo id or a loaded diffusers pipeline of
        any family in `gill_hf.decoders`: SD 1.x/2.x, SDXL, SD3) and a GILL model trained for it; returns
        that family's GILL pipeline ([`GillPipeline`], [`GillXLPipeline`], [`GillSD3Pipeline`]). The
        decoder's own negative conditioning for an empty prompt is computed once and stored; its text
        encoders are dropped unless `keep_text_encoder` (needed for `negative_prompt`).
        `default_num_inference_steps` / `default_guidance_scale` are the decoder's settings, used when
        a call does not pass them (saved with the pipeline).
        """
        import inspect

        from gill_hf.decoders import TEXT_COMPONENTS, decoder_family, encode_conditioning, load_decoder

        from . import PIPELINE_CLASSES

        decoder = load_decoder(stable_diffusion, **sd_kwargs) if isinstance(stable_diffusion, (str, os.PathLike)) else stable_diffusion
        family = decoder_family(decoder)
        target = PIPELINE_CLASSES[family]
        if not issubclass(target, cls):
            raise ValueError(f"{cls.__name__} cannot assemble a {family!r} decoder; use {target.__name__}.")
        parts = {k: v for k, v in decoder.components.items() if v is not None}
        missing = [c for c in TEXT_COMPONENTS[family] if c not in parts and not c.endswith("_3")]
        if missing:
            raise ValueError(f"The {family!r} decoder lacks {missing}, needed to encode its unconditional prompt.")
        if gill_model is not None and gill_model.config.decoder_family != family:
            raise ValueError(f"The GILL model was trained for a {gill_model.config.decoder_family!r} decoder; this one is {family!r}.")
        _, unconditional = encode_conditioning(decoder, [""])
        shapes = {k: list(v.shape[1:]) for k, v in unconditional.items()}
        if gill_model is not None and shapes != gill_model.config.decoder_spec["tensors"]:
            raise ValueError(f"The GILL model's mapper produces {gill_model.config.decoder_spec['tensors']}; this decoder takes {shapes}.")
        accepted = set(inspect.signature(target.__init__).parameters)
        components = {k: v for k, v in parts.items() if k in accepted and (keep_text_encoder or k not in TEXT_COMPONENTS[family])}
        return target(
            gill_model=gill_model, processor=processor, retrieval_index=retrieval_index,
            unconditional_embedding=GillUnconditionalEmbedding.from_tensors(unconditional),
            default_num_inference_steps=default_num_inference_steps, default_guidance_scale=default_guidance_scale, **components,
        )

    def push_to_hub(self, repo_id: str, *, api=None, **kwargs) -> str:
        """Saves the pipeline, renders its model card from `model_card.md` and uploads both once
        (see `gill_hf.hub.push_to_hub`)."""
        from gill_hf.hub import push_to_hub

        return push_to_hub(self, repo_id, api=api, **kwargs)

    # ----- properties used by callbacks (as in StableDiffusionPipeline) -------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ----- steps -----------------------------------------------------------------------------------

    def check_inputs(
        self, max_new_tokens, num_inference_steps, height, width, num_images_per_prompt, decoding, image_source,
        do_sample, temperature, top_p, min_word_tokens, force_image, max_images, num_retrieved, output_type,
        negative_prompt, negative_prompt_embeds, callback_on_step_end_tensor_inputs, guidance_scale=1.0,
        gen_scale_factor=1.0, ret_scale_factor=1.0, latents=None, flags=None,
    ) -> None:
        for name, value in (flags or {}).items():
            if not isinstance(value, bool):  # "no" would be truthy
                raise TypeError(f"`{name}` must be a bool, got {value!r}.")
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int (or None for the UNet's size), got {value!r}.")
        for name, value, low, high in (
            ("guidance_scale", guidance_scale, 0.0, 1e4), ("temperature", temperature, 0.0, 1e4),
            ("gen_scale_factor", gen_scale_factor, 0.0, 1e6), ("ret_scale_factor", ret_scale_factor, 0.0, 1e6),
            ("top_p", top_p, 0.0, 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"`{name}` must be a number, got {value!r}.")
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"`{name}` must be a finite number in [{low:g}, {high:g}], got {value!r}.")
        for name, tensor in (("latents", latents), ("negative_prompt_embeds", negative_prompt_embeds)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or not torch.isfinite(tensor).all()):
                raise ValueError(f"`{name}` must be a tensor of finite values.")
        for name, value, minimum in (
            ("max_new_tokens", max_new_tokens, 1), ("num_inference_steps", num_inference_steps, 1),
            ("num_images_per_prompt", num_images_per_prompt, 1), ("min_word_tokens", min_word_tokens, 0),
            ("num_retrieved", num_retrieved, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
        if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
            raise ValueError(f"`max_images` must be None or an int >= 1, got {max_images!r}.")
        if height % self.vae_scale_factor or width % self.vae_scale_factor or height <= 0 or width <= 0:
            raise ValueError(f"`height` and `width` must be positive multiples of {self.vae_scale_factor}, got {height} and {width}.")
        if decoding not in DECODING_MODES:
            raise ValueError(f"`decoding` must be one of {DECODING_MODES}, got {decoding!r}.")
        if image_source not in IMAGE_SOURCES:
            raise ValueError(f"`image_source` must be one of {IMAGE_SOURCES}, got {image_source!r}.")
        if image_source == "retrieved" and self.retrieval_index is None:
            raise ValueError("`image_source='retrieved'` needs a `retrieval_index`; this pipeline has none.")
        if self.retrieval_index is not None and image_source != "generated" and num_images_per_prompt > num_retrieved:
            raise ValueError(
                f"`num_images_per_prompt` ({num_images_per_prompt}) exceeds `num_retrieved` ({num_retrieved}): a retrieved "
                "block shows its top `num_images_per_prompt` candidates; raise `num_retrieved`."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if do_sample and not (decoding == "reference" and temperature == 0) and not temperature > 0:
            raise ValueError(f"`temperature` must be > 0 when sampling, got {temperature!r}.")
        if not 0 < top_p <= 1:
            raise ValueError(f"`top_p` must lie in (0, 1], got {top_p!r}.")
        if force_image:
            # The block must fit once min_word_tokens have passed (in reference mode it counts once).
            needed = min_word_tokens + (1 if decoding == "reference" else self.gill_model.config.num_img_tokens)
            if max_new_tokens < needed:
                raise ValueError(
                    f"`force_image=True` needs `max_new_tokens` >= {needed} (`min_word_tokens` + a whole [IMG] block), got {max_new_tokens}."
                )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if negative_prompt is not None and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError("`negative_prompt` needs the SD `text_encoder` and `tokenizer`; pass `negative_prompt_embeds` instead.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"`negative_prompt` must be a str, got {type(negative_prompt).__name__}.")
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has {bad}; allowed: {self._callback_tensor_inputs}.")

    def _token_ids(self) -> GillTokenIds:
        tokenizer = self.processor.tokenizer
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        config = self.gill_model.config
        return GillTokenIds(
            img_token_ids=list(config.img_token_ids),
            image_token_id=config.image_token_id,
            vocab_size=config.vocab_size or len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            newline_token_id=newline[0] if newline else None,
        )

    @torch.no_grad()
    def encode_prompt(
        self, prompt, prompt_images, options: GillDecodingOptions, generators: list, device: torch.device, truncation: bool = False
    ) -> tuple[list[DecodedRow], list[ImageBlock], list]:
        """Tokenizes the prompts, decodes the answers and maps every `[IMG]` block to SD
        `prompt_embeds` and a retrieval embedding. Returns the rows, the blocks and one generator
        per prompt."""
        n_img = self.gill_model.config.num_img_tokens
        room = options.token_limit(n_img)  # context kept free for the answer (reference mode: 8 a step)
        context = getattr(self.gill_model.config.text_config, "max_position_embeddings", None)
        max_length = None if context is None else context - room
        if max_length is not None and max_length < 1:
            raise ValueError(f"`max_new_tokens`={options.max_new_tokens} leaves no room for a prompt in the LM's context of {context} tokens.")
        inputs = self.processor(text=prompt, images=prompt_images, padding_side="left", max_length=max_length, truncation=truncation)
        batch = inputs["input_ids"].shape[0]
        if len(generators) == 1 and batch > 1:
            generators = generators * batch
        elif len(generators) != batch:
            raise ValueError(f"`generator` is a list of {len(generators)} generators for {batch} prompts; pass one per prompt.")
        pixel_values = inputs.get("pixel_values")
        steps = options.max_new_tokens + 1
        bar_config = {"leave": False, **getattr(self, "_progress_bar_config", {})}  # a user's config wins
        with tqdm(total=steps, desc="GILL decoding", **bar_config) as bar:
            rows = gill_decode(
                self.gill_model, inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                None if pixel_values is None else pixel_values.to(device), options, self._token_ids(), generators,
                on_step=lambda: bar.update(1) if bar.n < steps else None,
            )
        hidden = [row.img_hidden_states for row in rows]
        owners = [i for i, h in enumerate(hidden) for _ in range(h.shape[0])]
        blocks = []
        if owners:
            states = torch.cat(hidden)
            conditioning = self.gill_model.get_decoder_conditioning(states)
            text_embeds = self.gill_model.get_text_retrieval_embeds(states)
            pooled = conditioning.get("pooled_prompt_embeds")
            blocks = [ImageBlock(p, states[j], conditioning["prompt_embeds"][j], text_embeds[j], None if pooled is None else pooled[j])
                      for j, p in enumerate(owners)]
        return rows, blocks, generators

    def encode_negative_prompt(self, negative_prompt, negative_prompt_embeds, device, dtype) -> torch.Tensor:
        """The unconditional conditioning `(1 or n, num_clip_tokens, gen_emb_dim)`: given embeddings,
        SD's encoding of `negative_prompt`, the stored encoding of `""`, SD's encoding of `""`, or
        (none of those components present) zeros."""
        config = self.gill_model.config
        if negative_prompt_embeds is not None:
            embeds = negative_prompt_embeds
        elif negative_prompt is not None:
            embeds = encode_text(self.text_encoder, self.tokenizer, [negative_prompt])
        elif self.unconditional_embedding is not None:
            embeds = self.unconditional_embedding.embeds
        elif self.text_encoder is not None and self.tokenizer is not None:
            embeds = encode_text(self.text_encoder, self.tokenizer, [""])
        else:  # an optional component is absent: zeros, as SDXL's `force_zeros_for_empty_prompt` does
            logger.warning_once("The pipeline has no `unconditional_embedding` and no SD text encoder: classifier-free "
                                "guidance uses zeros as the unconditional embedding (pass `negative_prompt_embeds` to choose).")
            embeds = torch.zeros(1, config.num_clip_tokens, config.gen_emb_dim)
        if embeds.ndim != 3 or embeds.shape[1:] != (config.num_clip_tokens, config.gen_emb_dim):
            raise ValueError(f"`negative_prompt_embeds` must be (n, {config.num_clip_tokens}, {config.gen_emb_dim}), got {tuple(embeds.shape)}.")
        return embeds.to(device=device, dtype=dtype)

    def prepare_latents(self, blocks: list[ImageBlock], generators, num_images_per_prompt, height, width, dtype, device, latents=None,
                        scale: bool = True) -> torch.Tensor:
        """Initial noise for every generated image: each block's images draw from their prompt's
        generator, blocks in order (a single shared generator then serves the batch in order); times
        the scheduler's `init_noise_sigma` unless `scale` is False (a decoder pipeline scales its own)."""
        shape = (num_images_per_prompt, self.denoiser.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            noise = [randn_tensor(shape, generator=generators[b.prompt], device=device, dtype=dtype) for b in blocks]
            latents = torch.cat(noise)
        else:
            total = len(blocks) * num_images_per_prompt
            if latents.shape[1:] != shape[1:] or latents.shape[0] not in (num_images_per_prompt, total):
                raise ValueError(f"`latents` must be ({num_images_per_prompt} or {total}, {', '.join(map(str, shape[1:]))}), got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=dtype)
            if latents.shape[0] != total:  # one set per block
                latents = latents.repeat(len(blocks), 1, 1, 1)
        return latents * self.scheduler.init_noise_sigma if scale else latents

    def run_safety_checker(self, image: torch.Tensor, device, dtype) -> torch.Tensor:
        if self.safety_checker is None:
            return image
        pil = self.image_processor.postprocess(image, output_type="pil")
        inputs = self.feature_extractor(pil, return_tensors="pt").to(device)
        image, _ = self.safety_checker(images=image, clip_input=inputs.pixel_values.to(dtype))
        return image

    def _retrieve_and_decide(self, blocks: list[ImageBlock], image_source: str, num_retrieved: int) -> bool:
        """Scores every block against the index (never repeating an image within an answer) and
        chooses each block's source. Returns whether a decision was made."""
        index, model = self.retrieval_index, self.gill_model
        seen: dict[int, set[int]] = {}
        for block in blocks:
            if index is not None:
                banned = seen.setdefault(block.prompt, set())
                block.scores, block.indices = index.search(block.text_embeds, k=num_retrieved, exclude=sorted(banned))
                banned.update(int(i) for i in block.indices if i >= 0)
            block.source = "retrieved" if image_source == "retrieved" else "generated"
        decide = image_source == "auto" and index is not None and model.decision_head is not None
        if decide and blocks:
            img0 = torch.stack([b.hidden[0] for b in blocks])
            best = None
            if model.config.decision_head_type == "hidden_and_score":
                # The head was trained on the reference's scores: cosine times exp(logit_scale).
                best = torch.stack([b.scores[0] for b in blocks]).to(img0.device) * model.logit_scale.exp()
            probs = model.get_decision_probs(img0, best)
            for block, p in zip(blocks, probs):
                block.decision = p
                block.source = "retrieved" if p[1] > p[0] else "generated"
        return decide

    def _rescore(self, blocks: list[ImageBlock], images: torch.Tensor, num_images_per_prompt: int, reference: bool = False) -> None:
        """Orders each generated block's images by the cosine of their retrieval embedding to the
        block's (as the reference does; in reference mode after its `resize((224, 224))`)."""
        pil = self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(images))  # images are in [0, 1]
        if reference:
            pil = [image.resize((224, 224)) for image in pil]
        pixels = self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        image_embeds = self.gill_model.get_image_retrieval_embeds(pixel_values=pixels.to(self.gill_model.device))
        for j, block in enumerate(blocks):
            part = slice(j * num_images_per_prompt, (j + 1) * num_images_per_prompt)
            scores = image_embeds[part].float() @ block.text_embeds.float().to(image_embeds.device)
            order = torch.argsort(scores, descending=True, stable=True)
            block.generated_scores = scores[order].cpu()
            block.images = [images[part][i] for i in order.tolist()]

    # ----- call ------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list | None = None,
        prompt_images: list | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_word_tokens: int = 0,
        ret_scale_factor: float = 1.0,
        gen_scale_factor: float = 1.0,
        decoding: str = "default",
        force_image: bool = False,
        max_images: int | None = None,
        num_retrieved: int = 3,
        image_source: str = "auto",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        truncation: bool = False,
    ) -> GillPipelineOutput | tuple:
        r"""
        Answers interleaved image-and-text prompts with text and images.

        Args:
            prompt: a `str` (its `<image>` placeholders bind to `prompt_images`), a list mixing `str`
                and images (one interleaved prompt), a list of `str` (a batch; `prompt_images` then a
                list of lists) or a list of lists (a batch of interleaved prompts).
            prompt_images: the placeholders' images.
            max_new_tokens: token budget (default mode; an `[IMG]` block counts 8 and is never cut) or
                step budget (`decoding="reference"`; a block counts once).
            do_sample, temperature, top_p: sampling (greedy by default; in reference mode a
                temperature of 0 is greedy too).
            min_word_tokens, ret_scale_factor, gen_scale_factor: the reference's `[IMG0]` controls.
            decoding: `"default"` (KV-cached, EOS stop) or `"reference"` (the reference's rules).
            force_image: every answer gets at least one block.
            max_images: blocks per answer (None: no cap; 1 in reference mode).
            num_retrieved: retrieval candidates scored per block.
            image_source: `"auto"` (the decision head chooses), `"generated"` or `"retrieved"`.
            height, width, num_inference_steps, guidance_scale, negative_prompt, negative_prompt_embeds,
            num_images_per_prompt, latents, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as in `StableDiffusionPipeline` (images per block);
                `num_inference_steps` / `guidance_scale` default to the pipeline's saved settings
                (`config.default_num_inference_steps` / `default_guidance_scale`).
            negative_pooled_prompt_embeds: the negative pooled vector, for decoders with one (SDXL, SD3).
            generator: one generator or one per prompt; drives token sampling, then each block's latents.
            truncation: keep the last tokens of a prompt too long for the LM's context (with a warning)
                instead of raising.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        num_inference_steps = self.config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        height = height or self.denoiser.config.sample_size * self.vae_scale_factor
        width = width or self.denoiser.config.sample_size * self.vae_scale_factor
        self.check_inputs(
            max_new_tokens, num_inference_steps, height, width, num_images_per_prompt, decoding, image_source,
            do_sample, temperature, top_p, min_word_tokens, force_image, max_images, num_retrieved, output_type,
            negative_prompt, negative_prompt_embeds, callback_on_step_end_tensor_inputs, guidance_scale,
            gen_scale_factor, ret_scale_factor, latents,
            flags={"do_sample": do_sample, "force_image": force_image, "return_dict": return_dict, "truncation": truncation},
        )
        if prompt is None:
            raise ValueError("`prompt` is required.")
        self._guidance_scale, self._interrupt, self._num_timesteps = guidance_scale, False, 0
        device = self._execution_device
        options = GillDecodingOptions(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            min_word_tokens=min_word_tokens, ret_scale_factor=ret_scale_factor, gen_scale_factor=gen_scale_factor,
            force_image=force_image, max_images=max_images if max_images is not None or decoding != "reference" else 1,
            decoding=decoding, numpy_blas=self.numpy_blas,
        )
        generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]

        # 1. Decode the answers; map each [IMG] block to prompt_embeds and a retrieval embedding.
        rows, blocks, generators = self.encode_prompt(prompt, prompt_images, options, generators, device, truncation)
        # 2. Retrieval and the retrieve-or-generate decision, per block.
        decided = self._retrieve_and_decide(blocks, image_source, num_retrieved)
        # 3. Stable Diffusion for the blocks that generate.
        generate = [b for b in blocks if b.source == "generated"]
        if generate:
            images = self._generate_images(
                generate, generators, num_images_per_prompt, height, width, num_inference_steps, guidance_scale,
                negative_prompt, negative_prompt_embeds, latents, callback_on_step_end, callback_on_step_end_tensor_inputs, device,
                decode=output_type != "latent", negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            )
            if output_type == "latent":  # no pixels to re-score: generated_scores stay NaN
                for j, block in enumerate(generate):
                    block.images = list(images[j * num_images_per_prompt : (j + 1) * num_images_per_prompt])
            else:
                self._rescore(generate, images, num_images_per_prompt, reference=decoding == "reference")
        for block in blocks:
            if block.source == "retrieved":
                chosen = [int(i) for i in block.indices[:num_images_per_prompt] if i >= 0]
                block.images = [self.retrieval_index.get_image(i) for i in chosen]
                if output_type == "latent":
                    block.images = [self._encode_latents(image, device) for image in block.images]
        self.maybe_free_model_hooks()

        # 4. Assemble, one entry per prompt.
        output = self._assemble(rows, blocks, num_images_per_prompt, output_type, decided, decoding == "reference")
        if return_dict:
            return output
        # Every field in declaration order (`to_tuple` would drop the None ones and shift the rest).
        return tuple(getattr(output, name) for name in GillPipelineOutput.__dataclass_fields__)

    def _encode_latents(self, image, device) -> torch.Tensor:
        """A retrieved image as the decoder's latents (the VAE posterior's mean), for `output_type="latent"`."""
        pixels = self.image_processor.preprocess(image).to(device=device, dtype=self.vae.dtype)
        return (self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor)[0]

    def _generate_images(
        self, blocks, generators, num_images_per_prompt, height, width, num_inference_steps, guidance_scale,
        negative_prompt, negative_prompt_embeds, latents, callback_on_step_end, callback_tensor_inputs, device, decode=True,
        negative_pooled_prompt_embeds=None,
    ) -> torch.Tensor:
        if negative_pooled_prompt_embeds is not None:
            raise ValueError("`negative_pooled_prompt_embeds` is for decoders with a pooled vector (SDXL, SD3); this one has none.")
        dtype = self.unet.dtype
        prompt_embeds = torch.stack([b.prompt_embeds for b in blocks]).to(device=device, dtype=dtype)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        negative_prompt_embeds = self.encode_negative_prompt(negative_prompt, negative_prompt_embeds, device, dtype)
        if negative_prompt_embeds.shape[0] not in (1, prompt_embeds.shape[0]):
            raise ValueError(
                f"`negative_prompt_embeds` holds {negative_prompt_embeds.shape[0]} embeddings; expected 1 or one per "
                f"generated image ({prompt_embeds.shape[0]})."
            )
        negative_prompt_embeds = negative_prompt_embeds.expand(prompt_embeds.shape[0], -1, -1)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(blocks, generators, num_images_per_prompt, height, width, prompt_embeds.dtype, device, latents)
        # The scheduler's step noise (DDPM, ancestral samplers): each image's row from its prompt's generator,
        # so a prompt draws the same noise in a batch as alone.
        row_generators = [generators[b.prompt] for b in blocks for _ in range(num_images_per_prompt)]
        extra_step_kwargs = self.prepare_extra_step_kwargs(row_generators if any(row_generators) else None, 0.0)
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                cfg = self.do_classifier_free_guidance  # read each step: a callback may change `_guidance_scale`
                model_input = torch.cat([latents] * 2) if cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                context = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
                noise_pred = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
                if cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + self.guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {k: tensors[k] for k in callback_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if not torch.isfinite(latents).all():
                        raise ValueError(f"`callback_on_step_end` returned latents with NaN or infinite values at step {i}.")
                progress_bar.update()
        if not decode:
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        image = self.run_safety_checker(image, device, prompt_embeds.dtype)
        return self.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * image.shape[0])

    def prepare_extra_step_kwargs(self, generator, eta) -> dict:
        import inspect

        params = set(inspect.signature(self.scheduler.step).parameters)
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}

    def _assemble(self, rows, blocks, num_images_per_prompt, output_type, decided, reference: bool = False) -> GillPipelineOutput:
        n_prompts = len(rows)
        per_prompt = [[b for b in blocks if b.prompt == p] for p in range(n_prompts)]
        config = self.gill_model.config
        has_index = self.retrieval_index is not None

        def stack(values, shape, fill):
            return torch.stack(values).cpu() if values else torch.full(shape, fill)

        out = GillPipelineOutput(
            text=[answer_text(self.processor, list(row.token_ids), reference) for row in rows],
            images=[[convert_image(img, output_type) for b in bs for img in b.images] for bs in per_prompt],
            image_sources=[[b.source for b in bs for _ in b.images] for bs in per_prompt],
            token_ids=[list(row.token_ids) for row in rows],
            prompt_embeds=[stack([b.prompt_embeds for b in bs], (0, config.num_clip_tokens, config.gen_emb_dim), 0.0) for bs in per_prompt],
            retrieval_scores=None, retrieval_indices=None, generated_scores=None, decision_probs=None,
        )
        if config.pooled_emb_dim is not None:
            out.pooled_prompt_embeds = [stack([b.pooled_prompt_embeds for b in bs], (0, config.pooled_emb_dim), 0.0) for bs in per_prompt]
        if has_index:
            k = blocks[0].scores.shape[-1] if blocks else 0
            out.retrieval_scores = [stack([b.scores for b in bs], (0, k), 0.0) for bs in per_prompt]
            out.retrieval_indices = [stack([b.indices for b in bs], (0, k), 0).long() for bs in per_prompt]
        nan_row = torch.full((num_images_per_prompt,), float("nan"))
        out.generated_scores = [
            stack([b.generated_scores if b.generated_scores is not None else nan_row for b in bs], (0, num_images_per_prompt), 0.0)
            for bs in per_prompt
        ]
        if decided:
            out.decision_probs = [stack([b.decision for b in bs], (0, 2), 0.0).float() for bs in per_prompt]
        return out


__all__ = ["GillPipeline"]
