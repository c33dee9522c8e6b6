"""GILL: a frozen causal LM that reads interleaved images and text and emits [IMG] blocks that are
decoded into Stable Diffusion prompt embeddings, retrieval embeddings and a retrieve-or-generate
decision (Koh, Fried, Salakhutdinov, NeurIPS 2023).

This module depends only on torch and transformers. Loading backbones by reference goes through
`GillForConditionalGeneration.backbone_resolver`, which the `gill_hf` package installs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.tokenization_utils_base import AddedToken
from transformers.utils import ModelOutput, cached_file
from transformers.utils import logging as transformers_logging

from .checkpointing import ADAPTER_WEIGHTS_NAME, load_adapter_weights, looks_like_a_local_path, save_adapter_weights
from .configuration_gill import GillConfig
from .heads_gill import GillDecisionHead, GillMapper
from .manifest import MANIFEST_NAME, load_consistently, read_manifest, save_folder, verify_folder
from .training_passes import training_forward

IMAGE_TOKEN = "<|image|>"


def img_token_names(num_img_tokens: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(num_img_tokens)]


def add_gill_tokens(tokenizer, num_img_tokens: int = 8) -> tuple[int, list[int]]:
    """Adds `<|image|>` and then `[IMG0]`.. to `tokenizer` (in place, in the reference's order, so
    OPT gets 50265 and 50266-50273) and returns their ids. Tokens already present keep their ids.
    """
    # `add_tokens` keeps the list order and skips tokens already present, so ids never move.
    tokens = [IMAGE_TOKEN, *img_token_names(num_img_tokens)]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in tokens], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    img_token_ids = tokenizer.convert_tokens_to_ids(img_token_names(num_img_tokens))
    return image_token_id, list(img_token_ids)


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
            output and `gen_targets`.
        caption_logits / caption_labels: the captioning pass (visual prefix included in the labels as -100).
        text_logits / text_labels: the text pass.
        img_hidden_states: `(batch, num_img_tokens, hidden)` LM states at the `[IMG]` positions.
        text_embeds / image_embeds: L2-normalised retrieval embeddings, `(batch, ret_emb_dim)`.
        logits_per_image: `exp(logit_scale) * image_embeds @ text_embeds.T` over the (gathered) batch.
        prompt_embeds: `(batch, num_clip_tokens, gen_emb_dim)` mapper output.
    """

    loss: torch.FloatTensor | None = None
    caption_loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    gen_loss: torch.FloatTensor | None = None
    caption_logits: torch.FloatTensor | None = None
    caption_labels: torch.LongTensor | None = None
    text_logits: torch.FloatTensor | None = None
    text_labels: torch.LongTensor | None = None
    img_hidden_states: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    prompt_embeds: torch.FloatTensor | None = None


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


class GillPreTrainedModel(PreTrainedModel):
    config: GillConfig
    config_class = GillConfig
    base_model_prefix = "gill"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["GillMapper"]
    _skip_keys_device_placement = ["cache"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, GillMapper):
            init.normal_(module.queries, mean=0.0, std=1.0)  # randn, as the reference
        elif isinstance(module, GillForConditionalGeneration):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            init.normal_(module.img_embeddings, mean=0.0, std=std)
            if module.img_output_embeddings is not None:
                init.normal_(module.img_output_embeddings, mean=0.0, std=std)
        else:
            super()._init_weights(module)


class GillForConditionalGeneration(GillPreTrainedModel, GenerationMixin):
    r"""
    GILL on any causal LM and a CLIP-like vision tower, both frozen. Trainable: the visual prefix,
    the `[IMG]` rows (input rows, and output rows for untied LMs), the retrieval heads,
    `logit_scale` and the mapper. The decision head trains separately and is frozen here.

    The LM's weights are never resized: `[IMG]` ids below the LM's row count override that row,
    ids above it extend the logits (see `logits_width`).

    Example:

    ```python
    >>> import torch
    >>> from transformers import CLIPVisionConfig, OPTConfig
    >>> from gill_hf import GillConfig, GillForConditionalGeneration
    >>> text = OPTConfig(vocab_size=64, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
    ...                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    >>> vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                           num_attention_heads=2, image_size=32, patch_size=8)
    >>> config = GillConfig(text_config=text, vision_config=vision, img_token_ids=list(range(56, 64)),
    ...                     image_token_id=55, vocab_size=64, ret_emb_dim=16, gen_emb_dim=24,
    ...                     num_clip_tokens=5, mapper_hidden_size=16, mapper_ffn_dim=32)
    >>> model = GillForConditionalGeneration(config)
    >>> ids = torch.tensor([[2, 10, 11, 12] + list(range(56, 64))])
    >>> out = model(input_ids=ids, pixel_values=torch.rand(1, 3, 32, 32), gen_targets=torch.zeros(1, 5, 24))
    >>> sorted(k for k in out.keys() if k.endswith("loss"))
    ['caption_loss', 'contrastive_loss', 'gen_loss', 'loss', 'text_loss']
    ```
    """

    #: Maps a backbone reference (a hub id, path or embedded-artifact dict) to what
    #: `from_pretrained` accepts. `gill_hf` installs a resolver that also knows embedded artifacts.
    backbone_resolver: Callable[[Any], tuple[str, dict]] = staticmethod(lambda ref: (ref, {}))
    #: The Hub push (`gill_hf.hub.push_to_hub`), installed by `gill_hf`.
    hub_pusher: Callable[..., Any] | None = None
    #: Called as `(model, folder)` after an adapter checkpoint loads, for what the package stores
    #: beside GILL's tensors (LoRA layers of the LM); installed by `gill_hf`.
    adapter_extension_loader: Callable[[Any, str], Any] | None = None

    def __init__(
        self,
        config: GillConfig,
        language_model: PreTrainedModel | None = None,
        vision_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        # `GillConfig(text_config=lm.config)` shares the backbone's config object and leaves its
        # attention implementation unset; without one, a cached decoding step attends differently
        # from a full forward (sdpa's causal flag on a 1-token query), so give it the composite's.
        for sub_config in (config.text_config, config.vision_config):
            if getattr(sub_config, "_attn_implementation", None) is None:
                sub_config._attn_implementation = config._attn_implementation
        if config.img_token_ids is None:
            raise ValueError("`config.img_token_ids` is not set: build the config from a GillProcessor's tokenizer.")
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.vision_model = vision_model or AutoModel.from_config(config.vision_config)
        for backbone in (language_model, vision_model):
            if backbone is not None:  # loaded weights: never re-initialise them in post_init
                for module in backbone.modules():
                    module._is_hf_initialized = True
        self._check_backbones()

        text_hidden = config.text_config.hidden_size
        vision_hidden = config.vision_config.hidden_size
        n_img = config.num_img_tokens
        self.visual_projection = nn.Linear(vision_hidden, text_hidden * config.num_visual_tokens)
        self.img_embeddings = nn.Parameter(torch.empty(n_img, text_hidden))
        self.img_output_embeddings = None if config.lm_ties_embeddings else nn.Parameter(torch.empty(n_img, text_hidden))
        self.text_retrieval_projection = nn.Linear(text_hidden, config.ret_emb_dim)
        self.image_retrieval_projection = nn.Linear(vision_hidden, config.ret_emb_dim)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.mapper = GillMapper(config)
        self.decision_head = GillDecisionHead(config) if config.decision_head_type else None
        self.post_init()
        self.freeze_backbones()

    # ----- structure -------------------------------------------------------------------------

    def _check_backbones(self) -> None:
        embed = self.language_model.get_input_embeddings()
        head = self.language_model.get_output_embeddings()
        hidden = self.config.text_config.hidden_size
        if embed is None or head is None or embed.weight.shape[1] != hidden or head.weight.shape[1] != hidden:
            raise ValueError(
                f"GILL needs a causal LM whose last hidden state and input embeddings share a width; "
                f"{type(self.language_model).__name__} has input width "
                f"{None if embed is None else embed.weight.shape[1]}, output width "
                f"{None if head is None else head.weight.shape[1]} and hidden_size {hidden}."
            )
        if not hasattr(self.config.vision_config, "hidden_size"):
            raise ValueError("`vision_config` must describe a vision tower with a `hidden_size` and a pooled output.")

    def freeze_backbones(self) -> None:
        """Freezes the LM / vision tower as the config says, and the decision head (it trains apart)."""
        frozen = [m for m, flag in ((self.language_model, self.config.freeze_lm), (self.vision_model, self.config.freeze_vm)) if flag]
        frozen += [self.decision_head] if self.decision_head is not None else []
        for module in frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts stay in eval mode (dropout off) while the heads train, as in the reference.
        if self.config.freeze_lm:
            self.language_model.eval()
        if self.config.freeze_vm:
            self.vision_model.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return None  # the LM keeps its own head; GILL adds [IMG] columns in `compute_logits`

    @property
    def img_token_ids(self) -> torch.LongTensor:
        # Built from the config on use: a non-persistent buffer would not survive meta-device loading.
        return torch.tensor(self.config.img_token_ids, device=self.img_embeddings.device)

    @property
    def num_lm_rows(self) -> int:
        return self.language_model.get_input_embeddings().weight.shape[0]

    @property
    def logits_width(self) -> int:
        """max(LM rows, largest added id + 1): ids above the LM's rows extend the logits."""
        added = list(self.config.img_token_ids)
        if self.config.image_token_id is not None:
            added.append(self.config.image_token_id)
        return max(self.num_lm_rows, max(added) + 1)

    @property
    def img_output_rows(self) -> torch.Tensor:
        return self.img_embeddings if self.img_output_embeddings is None else self.img_output_embeddings

    # ----- embeddings and logits ---------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """LM input embeddings of `input_ids`, `[IMG]` ids taking GILL's own rows."""
        is_img = input_ids[..., None] == self.img_token_ids
        img_slot = is_img.float().argmax(-1)
        is_img = is_img.any(-1)
        unknown = (input_ids >= self.num_lm_rows) & ~is_img
        if unknown.any() or (input_ids < 0).any():
            bad = input_ids[unknown | (input_ids < 0)].unique().tolist()
            raise ValueError(
                f"`input_ids` holds ids {bad} that have no embedding row (the LM has {self.num_lm_rows} "
                f"rows; `<|image|>` must be replaced by an image, not fed as a token)."
            )
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_img, 0))
        img_rows = self.img_embeddings.to(embeds.dtype)[img_slot]
        return torch.where(is_img[..., None], img_rows, embeds)

    def compute_logits(self, last_hidden_state: torch.Tensor, lm_logits: torch.Tensor) -> torch.Tensor:
        """Extends the LM's logits with the `[IMG]` columns computed from GILL's output rows."""
        img_logits = last_hidden_state @ self.img_output_rows.to(last_hidden_state.dtype).T
        extra = self.logits_width - lm_logits.shape[-1]
        if extra > 0:  # columns without an LM row behind them can never be chosen
            pad = lm_logits.new_full((*lm_logits.shape[:-1], extra), float("-inf"))
            lm_logits = torch.cat([lm_logits, pad], dim=-1)
        return lm_logits.index_copy(-1, self.img_token_ids, img_logits.to(lm_logits.dtype))

    # ----- GILL heads ------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """The frozen vision tower's `pooler_output`, `(n_images, vision_hidden)`."""
        if pixel_values.ndim != 4:
            raise ValueError(f"`pixel_values` must be (n_images, channels, height, width), got shape {tuple(pixel_values.shape)}.")
        dtype = next(self.vision_model.parameters()).dtype
        return self.vision_model(pixel_values=pixel_values.to(dtype)).pooler_output

    def _image_features(self, pixel_values, image_features) -> torch.Tensor:
        if (pixel_values is None) == (image_features is None):
            raise ValueError("Pass exactly one of `pixel_values` and `image_features`.")
        return self.get_image_features(pixel_values) if image_features is None else image_features

    def get_visual_prefix(self, pixel_values=None, image_features=None) -> torch.Tensor:
        """Image -> `(n_images, num_visual_tokens, text_hidden)` LM input vectors."""
        features = self._image_features(pixel_values, image_features)
        prefix = self.visual_projection(features.to(self.visual_projection.weight.dtype))
        return prefix.reshape(features.shape[0], self.config.num_visual_tokens, -1)

    def get_image_retrieval_embeds(self, pixel_values=None, image_features=None) -> torch.Tensor:
        """Image -> L2-normalised retrieval embedding, `(n_images, ret_emb_dim)`."""
        features = self._image_features(pixel_values, image_features)
        return F.normalize(self.image_retrieval_projection(features.to(self.image_retrieval_projection.weight.dtype)), dim=-1)

    def get_text_retrieval_embeds(self, img_hidden_states: torch.Tensor) -> torch.Tensor:
        """`[IMG]` block states `(n, num_img_tokens, hidden)` (or `[IMG0]` states `(n, hidden)`) ->
        L2-normalised retrieval embedding from `[IMG0]`, `(n, ret_emb_dim)`."""
        img0 = img_hidden_states[:, 0] if img_hidden_states.ndim == 3 else img_hidden_states
        return F.normalize(self.text_retrieval_projection(img0.to(self.text_retrieval_projection.weight.dtype)), dim=-1)

    def get_prompt_embeds(self, img_hidden_states: torch.Tensor) -> torch.Tensor:
        """`[IMG]` block states `(n, num_img_tokens, hidden)` -> image-decoder conditioning
        `(n, num_clip_tokens, gen_emb_dim)`; the mapper sees states plus the `[IMG]` input rows."""
        if img_hidden_states.ndim != 3 or img_hidden_states.shape[1] != self.config.num_img_tokens:
            raise ValueError(
                f"`img_hidden_states` must be (n, {self.config.num_img_tokens}, hidden), got {tuple(img_hidden_states.shape)}."
            )
        dtype = self.mapper.input_proj.weight.dtype
        return self.mapper(img_hidden_states.to(dtype), self.img_embeddings.to(dtype).expand(img_hidden_states.shape[0], -1, -1))

    def get_decision_probs(self, img0_hidden_states: torch.Tensor, max_retrieval_scores: torch.Tensor | None = None) -> torch.Tensor:
        """`[IMG0]` states `(n, hidden)` -> `(n, 2)` probabilities, column 0 = generate, 1 = retrieve.
        The `"hidden_and_score"` head also needs each block's best retrieval score scaled by
        `exp(logit_scale)` (the reference's scores)."""
        if self.decision_head is None:
            raise ValueError("This model has no decision head (`config.decision_head_type` is None).")
        features = img0_hidden_states.to(self.decision_head.linear.weight.dtype)
        if self.config.decision_head_type == "hidden_and_score":
            if max_retrieval_scores is None:
                raise ValueError("`max_retrieval_scores` is required by the 'hidden_and_score' decision head.")
            features = torch.cat([features, max_retrieval_scores.to(features.dtype).reshape(-1, 1)], dim=-1)
        return self.decision_head(features).softmax(dim=-1)

    # ----- forward ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        gen_targets: torch.FloatTensor | None = None,
        concat_captions: bool | float = False,
        image_features: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Any | None = None,
        use_cache: bool | None = None,
        context_pixel_values: torch.FloatTensor | None = None,
        context_image_features: torch.FloatTensor | None = None,
        interleaved: torch.BoolTensor | None = None,
        paired: torch.BoolTensor | None = None,
        **kwargs,
    ) -> GillOutput | GillCausalLMOutputWithPast:
        r"""
        Two kinds of call share this entry point, as training and decoding share a model.

        **Which kind.** A call is a decoding call when a `cache`, `inputs_embeds` or `use_cache=True`
        is given; otherwise it is a training call when it carries a training input (`gen_targets`,
        `interleaved`, `paired`, `context_pixel_values` / `context_image_features`) whatever
        placeholders its rows hold, and a decoding call when its `input_ids` hold `<|image|>`
        placeholders (a prompt from `GillProcessor`); anything else is a training call.

        - **training**: `input_ids` are right-padded rows ending in the `[IMG0..7]` block. A caption
          row is `[BOS caption [IMG0..7] pad]` (`GillProcessor.build_training_inputs`); an
          interleaved row (`GillProcessor.build_interleaved_training_inputs`, flagged in
          `interleaved`) holds its context images as `<|image|>` runs, filled with the visual prefixes
          of `context_pixel_values` (or `context_image_features`) in row-major order. `pixel_values`
          (or `image_features`) hold one paired image per row: the caption's image, or the image an
          interleaved example produces (its contrastive pair); `paired` marks rows whose entry is a
          real image (default: all). `gen_targets` `(batch, num_clip_tokens, gen_emb_dim)` are the
          decoder's encodings of each row's caption / target caption. The captioning pass runs over
          the paired caption rows; one text pass runs over every row, its CE covering the text (after
          an interleaved row's last image) and `[IMG0]`. Returns [`GillOutput`].
          `concat_captions`: `True` always applies the reference's two-caption concatenation, a float
          in (0, 1) draws it per pass with that probability (torch's RNG); batches holding
          interleaved rows are never concatenated.
        - **decoding**: placeholders are replaced by the visual prefix of `pixel_values` and the LM
          runs once; returns [`GillCausalLMOutputWithPast`]. This is what `generate()` calls.
        """
        training_inputs = (gen_targets, interleaved, paired, context_pixel_values, context_image_features)
        if self._is_decoding_call(input_ids, inputs_embeds, cache, use_cache, training_inputs):
            return self._decoding_forward(
                input_ids, pixel_values, image_features, attention_mask, inputs_embeds, cache, use_cache, **kwargs
            )
        if kwargs.get("labels") is not None:
            raise ValueError("`labels` are built by the model from `input_ids`; do not pass them.")
        return training_forward(self, input_ids, pixel_values, image_features, gen_targets, concat_captions,
                                context_pixel_values, context_image_features, interleaved, paired)

    def _is_decoding_call(self, input_ids, inputs_embeds, cache, use_cache, training_inputs=()) -> bool:
        if cache is not None or inputs_embeds is not None or bool(use_cache):
            return True
        if any(value is not None for value in training_inputs):
            return False
        return self._holds_image_token(input_ids)

    def embed_prompt(self, input_ids: torch.LongTensor, pixel_values=None, image_features=None) -> torch.Tensor:
        """Embeds prompt ids, replacing each run of `num_visual_tokens` `<|image|>` placeholders
        by the visual prefix of the next image (images in row-major order)."""
        placeholder = input_ids == self.config.image_token_id if self.config.image_token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        n_slots = int(placeholder.sum())
        if n_slots == 0:
            if pixel_values is not None or image_features is not None:
                raise ValueError("Images were given but `input_ids` holds no `<|image|>` placeholders for them.")
            return self.embed_tokens(input_ids)
        if pixel_values is None and image_features is None:
            raise ValueError("`input_ids` holds `<|image|>` placeholders but no `pixel_values` were given.")
        prefix = self.get_visual_prefix(pixel_values, image_features)
        if prefix.shape[0] * prefix.shape[1] != n_slots:
            raise ValueError(
                f"`pixel_values` holds {prefix.shape[0]} images ({prefix.shape[0] * prefix.shape[1]} visual "
                f"vectors) but `input_ids` has {n_slots} `<|image|>` placeholders."
            )
        embeds = self.embed_tokens(input_ids.masked_fill(placeholder, 0))
        return embeds.masked_scatter(placeholder[..., None], prefix.to(embeds.dtype).reshape(-1, embeds.shape[-1]))

    def _run_lm(self, inputs_embeds: torch.Tensor, **kwargs):
        context = getattr(self.config.text_config, "max_position_embeddings", None)
        cache = kwargs.get("cache")
        length = inputs_embeds.shape[1] + (cache.get_seq_length() if cache is not None else 0)
        if context is not None and length > context:
            raise ValueError(
                f"The sequence ({length} positions, visual prefixes included) is longer than the LM's context "
                f"of {context}: shorten `input_ids` (GillProcessor(..., max_length=..., truncation=True))."
            )
        outputs = self.language_model(inputs_embeds=inputs_embeds, output_hidden_states=True, return_dict=True, **kwargs)
        return outputs, outputs.hidden_states[self.config.text_emb_layers[0]]

    def _decoding_forward(self, input_ids, pixel_values, image_features, attention_mask, inputs_embeds, cache, use_cache, **kwargs):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `input_ids` or `inputs_embeds`.")
            inputs_embeds = self.embed_prompt(input_ids, pixel_values, image_features)
        output_hidden_states = kwargs.pop("output_hidden_states", False)
        kwargs.pop("return_dict", None)  # outputs are always ModelOutputs
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        outputs, _ = self._run_lm(
            inputs_embeds, attention_mask=attention_mask, cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs
        )
        last_hidden = outputs.hidden_states[-1]
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            last_hidden = last_hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            last_hidden = last_hidden[:, logits_to_keep]
        return GillCausalLMOutputWithPast(
            logits=self.compute_logits(last_hidden, outputs.logits),
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=getattr(outputs, "attentions", None),
        )

    # ----- training forward --------------------------------------------------------------------

    # ----- generation --------------------------------------------------------------------------

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_features=None, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_features"] = image_features
        elif self._holds_image_token(model_inputs.get("input_ids")):
            # A generated `<|image|>` (a candidate under the reference's vocabulary when it has an LM
            # row) is a token with its own embedding row here, not a placeholder for an image.
            model_inputs["inputs_embeds"] = self.embed_tokens(model_inputs.pop("input_ids"))
        return model_inputs

    def _holds_image_token(self, input_ids: torch.LongTensor | None) -> bool:
        image_token_id = self.config.image_token_id
        return input_ids is not None and image_token_id is not None and bool((input_ids == image_token_id).any())

    # ----- construction, checkpoints ---------------------------------------------------------

    @classmethod
    def _load_backbones(cls, text_model: Any, vision_model: Any, **load_kwargs) -> tuple[PreTrainedModel, PreTrainedModel]:
        text_source, text_extra = cls.backbone_resolver(text_model)
        vision_source, vision_extra = cls.backbone_resolver(vision_model)
        language_model = AutoModelForCausalLM.from_pretrained(text_source, **text_extra, **load_kwargs)
        vision_config = AutoConfig.from_pretrained(vision_source, **vision_extra)
        if not hasattr(vision_config, "vision_config"):
            return language_model, AutoModel.from_pretrained(vision_source, config=vision_config, **vision_extra, **load_kwargs)
        # A full CLIP checkpoint names a dual-encoder config: load its vision tower only. Its text tower's
        # tensors are expected leftovers (no load report for them); a missing vision tensor is an error.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            vision, info = AutoModel.from_pretrained(vision_source, config=vision_config.vision_config, output_loading_info=True,
                                                     **vision_extra, **load_kwargs)
        finally:
            transformers_logging.set_verbosity(verbosity)
        if info["missing_keys"] or info.get("mismatched_keys"):
            raise ValueError(f"The vision tower at {vision_source!r} lacks or mis-shapes tensors: "
                             f"{sorted(info['missing_keys'])} {info.get('mismatched_keys') or ''}")
        return language_model, vision

    @classmethod
    def from_pretrained_backbones(
        cls, text_model: Any, vision_model: Any, *, tokenizer=None, dtype: torch.dtype | str | None = None, **gill_kwargs
    ) -> GillForConditionalGeneration:
        r"""
        Fresh GILL heads on frozen pretrained backbones.

        Args:
            text_model: a hub id, a local folder or a backbone reference of the causal LM.
            vision_model: the same for the vision tower (a full CLIP checkpoint gives its vision tower).
            tokenizer: the LM's tokenizer; loaded from `text_model` when omitted. `<|image|>` and the
                `[IMG]` tokens are added to it (`add_gill_tokens`), which fixes their ids.
            dtype: dtype of the backbones (the GILL heads stay float32).
            gill_kwargs: any [`GillConfig`] field (`gen_emb_dim`, `ret_emb_dim`, ...).
        """
        language_model, vision = cls._load_backbones(text_model, vision_model, dtype=dtype)
        if tokenizer is None:
            text_source, text_extra = cls.backbone_resolver(text_model)
            tokenizer = AutoTokenizer.from_pretrained(text_source, **text_extra)
        num_img_tokens = gill_kwargs.pop("num_img_tokens", 8)
        image_token_id, img_token_ids = add_gill_tokens(tokenizer, num_img_tokens)
        # Copies: building a composite config resets the attention implementation of the
        # sub-configs it is given, which would silently change how the loaded LM attends.
        config = GillConfig(
            text_config=language_model.config.to_dict(),
            vision_config=vision.config.to_dict(),
            num_img_tokens=num_img_tokens,
            img_token_ids=img_token_ids,
            image_token_id=image_token_id,
            vocab_size=len(tokenizer),
            backbone_references={"text_model": text_model, "vision_model": vision_model},
            **gill_kwargs,
        )
        model = cls(config, language_model=language_model, vision_model=vision)
        model.rescale_img_rows_()
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *, form: str = "full", **kwargs) -> None:
        r"""
        Saves in one of two forms through the manifest primitive (`gill_manifest.json`: each file's
        size and sha256, committed by one rename; files of the folder that this save does not
        write, other than the previous checkpoint's, are never touched; a crash leaves the old
        checkpoint or the new one):

        - `"full"`: the standard self-contained checkpoint (backbones included);
        - `"adapter"`: only GILL's tensors (`gill_adapter.safetensors`) + the config, whose
          `backbone_references` name the backbones that `from_pretrained` loads back.
        """
        if form not in ("full", "adapter"):
            raise ValueError(f"`form` must be 'full' or 'adapter', got {form!r}.")
        if form == "adapter":
            references = self.config.backbone_references or {}
            missing = [name for name in ("text_model", "vision_model") if not references.get(name)]
            if missing:
                raise ValueError(
                    f"The adapter form needs `config.backbone_references` for {missing}; save with form='full' instead."
                )
        with save_folder(save_directory) as staging:
            if form == "full":
                super().save_pretrained(staging, **kwargs)
            else:
                self.config.save_pretrained(staging)
                save_adapter_weights(self, staging)

    def push_to_hub(self, repo_id: str, *, form: str | None = None, api=None, **kwargs) -> Any:
        r"""
        Saves (in `form`: `None` chooses adapter whenever both backbones have references, else
        full), renders the model card from the package's `model_card.md` and uploads once through
        `api` (a `huggingface_hub.HfApi` by default; tests pass a folder-backed fake).
        """
        if self.hub_pusher is None:
            raise RuntimeError("`push_to_hub` is provided by the gill_hf package: `import gill_hf` first.")
        return self.hub_pusher(self, repo_id, form=form, api=api, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, text_model: Any = None, vision_model: Any = None, **kwargs):
        r"""
        Loads either checkpoint form. The adapter form loads its backbones from the references in
        its config (or from `text_model` / `vision_model` when given) through `backbone_resolver`;
        `dtype` and `device_map` apply to the backbones, GILL's heads follow the LM's device.
        A checkpoint missing any GILL or backbone tensor is a `ValueError` naming the keys.

        A folder with a `gill_manifest.json` is verified first (every file's size and sha256; an
        interrupted save is completed) and loaded as one version even while another process saves
        into it; only the files it names belong to the checkpoint.
        """
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token", "subfolder") if k in kwargs}

        def load(manifest: dict | None):
            return cls._load_checkpoint(pretrained_model_name_or_path, manifest, model_args, text_model, vision_model, kwargs, hub_kwargs)

        local = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(local):
            return load_consistently(local, load)
        if looks_like_a_local_path(pretrained_model_name_or_path):
            raise ValueError(f"The GILL checkpoint folder {local!r} does not exist.")
        manifest_file = cached_file(pretrained_model_name_or_path, MANIFEST_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if manifest_file is None:
            return load(None)
        snapshot = os.path.dirname(manifest_file)
        for name in read_manifest(snapshot)["files"]:  # fetch what the manifest names, then check it
            cached_file(pretrained_model_name_or_path, name, **hub_kwargs)
        return load(verify_folder(snapshot))

    @classmethod
    def _load_checkpoint(cls, pretrained_model_name_or_path, manifest, model_args, text_model, vision_model, kwargs, hub_kwargs):
        kwargs = dict(kwargs)
        adapter_file = None
        if _in_checkpoint(manifest, ADAPTER_WEIGHTS_NAME):
            adapter_file = cached_file(
                pretrained_model_name_or_path, ADAPTER_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
        if "config" not in kwargs:
            _check_saved_config(pretrained_model_name_or_path, hub_kwargs)
        if adapter_file is None:
            kwargs.pop("output_loading_info", None)
            try:
                model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
            except SafetensorError as error:
                raise ValueError(f"The weights of {str(pretrained_model_name_or_path)!r} cannot be read (damaged file?): {error}") from error
            if info["missing_keys"]:
                raise ValueError(
                    f"The checkpoint at {str(pretrained_model_name_or_path)!r} lacks keys {sorted(info['missing_keys'])}."
                )
            model._own_head_memory()
            model.freeze_backbones()  # loading materialises fresh parameters, which forget requires_grad
            return model
        config = kwargs.pop("config", None) or GillConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        references = config.backbone_references or {}
        text_model = text_model if text_model is not None else references.get("text_model")
        vision_model = vision_model if vision_model is not None else references.get("vision_model")
        if text_model is None or vision_model is None:
            raise ValueError(f"{adapter_file!r} is an adapter checkpoint but its config names no backbones.")
        load_kwargs = {k: kwargs[k] for k in ("dtype", "device_map") if k in kwargs}
        language_model, vision = cls._load_backbones(text_model, vision_model, **load_kwargs)
        _check_backbone_sizes(config, language_model.config, vision.config)
        model = cls(config, language_model=language_model, vision_model=vision)
        load_adapter_weights(model, adapter_file)
        if cls.adapter_extension_loader is not None:
            cls.adapter_extension_loader(model, os.path.dirname(adapter_file))
        model._own_head_memory(device=language_model.get_input_embeddings().weight.device)
        return model.eval()

    @torch.no_grad()
    def _own_head_memory(self, device: torch.device | None = None) -> None:
        """Gives GILL's head tensors fresh (aligned) storage, on `device` if given. Memory-mapped
        safetensors can sit at unaligned addresses, which sends CPU matmuls down other kernels and
        changes results in the last bits; the heads are small, so copying them is cheap."""
        for name, param in self.named_parameters():
            if not name.startswith(("language_model.", "vision_model.")):
                param.data = param.data.to(device=device or param.device, copy=True)

    @torch.no_grad()
    def rescale_img_rows_(self) -> None:
        """Sets every `[IMG]` row's L2 norm to the mean norm of the LM's rows (the reference does
        this after every optimizer step; doing it at init starts from the same scale)."""
        for rows, lm_rows in ((self.img_embeddings, self.get_input_embeddings().weight),
                              (self.img_output_embeddings, self.language_model.get_output_embeddings().weight)):
            if rows is None:
                continue
            keep = torch.ones(lm_rows.shape[0], dtype=torch.bool, device=lm_rows.device)
            keep[self.img_token_ids[self.img_token_ids < lm_rows.shape[0]]] = False
            target = lm_rows[keep].float().norm(dim=-1).mean()
            rows.mul_((target / rows.float().norm(dim=-1, keepdim=True)).to(rows.dtype))


def _in_checkpoint(manifest: dict | None, name: str) -> bool:
    """With a manifest, only the files it names belong to the checkpoint (a stale file of another
    save in the same folder is ignored); without one, whatever exists does."""
    return manifest is None or name in manifest["files"]


def _check_saved_config(pretrained_model_name_or_path, hub_kwargs: dict) -> None:
    """A GILL config must name both backbones: GillConfig's defaults (OPT-6.7B + ViT-L/14) would
    otherwise build a 7-billion-parameter model that the checkpoint never described."""
    config_file = cached_file(pretrained_model_name_or_path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if config_file is None:
        raise ValueError(f"{str(pretrained_model_name_or_path)!r} has no config.json: not a GILL checkpoint.")
    try:
        with open(config_file, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_file!r} is not readable JSON: {error}") from error
    missing = [key for key in ("text_config", "vision_config") if not isinstance(saved, dict) or not isinstance(saved.get(key), dict)]
    if missing:
        raise ValueError(f"{config_file!r} lacks {missing}: a GILL config names both backbones' configs.")


def _check_backbone_sizes(config: GillConfig, text_config, vision_config) -> None:
    """Backbones loaded for an adapter must have the sizes the GILL weights were trained on."""
    checks = [
        ("text_model", "hidden_size", config.text_config, text_config),
        ("text_model", "vocab_size", config.text_config, text_config),
        ("text_model", "num_hidden_layers", config.text_config, text_config),
        ("vision_model", "hidden_size", config.vision_config, vision_config),
        ("vision_model", "image_size", config.vision_config, vision_config),
    ]
    for backbone, field, saved, loaded in checks:
        if getattr(saved, field, None) != getattr(loaded, field, None):
            raise ValueError(
                f"The {backbone} backbone has {field}={getattr(loaded, field, None)} but the GILL weights were "
                f"trained on {field}={getattr(saved, field, None)}."
            )


__all__ = [
    "GillCausalLMOutputWithPast",
    "GillForConditionalGeneration",
    "GillOutput",
    "GillPreTrainedModel",
    "add_gill_tokens",
]
