"""GILL: a frozen causal LM that reads interleaved images and text and emits [IMG] blocks that are
decoded into Stable Diffusion prompt embeddings, retrieval embeddings and a retrieve-or-generate
decision (Koh, Fried, Salakhutdinov, NeurIPS 2023).

This module depends only on torch and transformers. Loading backbones by reference goes through
`GillForConditionalGeneration.backbone_resolver`, which the `gill_hf` package installs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin, LogitsProcessor,
                          LogitsProcessorList, PreTrainedModel)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .checkpoint_forms import GillCheckpointMixin
from .configuration_gill import GillConfig
from .heads_gill import GillDecisionHead, GillMapper
from .outputs_gill import GillCausalLMOutputWithPast, GillOutput
from .tokens_gill import IMAGE_TOKEN, add_gill_tokens, img_token_names
from .training_passes import training_forward


class GillPreTrainedModel(PreTrainedModel):
    config: GillConfig
    config_class = GillConfig
    base_model_prefix = "language_model"
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


class GillForConditionalGeneration(GillCheckpointMixin, GillPreTrainedModel, GenerationMixin):
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
        # What FSDP / accelerate's device maps must keep whole: the backbones' own layers and the mapper.
        self._no_split_modules = list(dict.fromkeys(
            ["GillMapper", *(self.language_model._no_split_modules or []), *(self.vision_model._no_split_modules or [])]))

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
        self.generation_config = self._plain_generation_config()

    def _plain_generation_config(self) -> GenerationConfig:
        """For `generate()` called directly (as transformers' pipelines do): the LM's special ids, and
        `<|image|>` (a placeholder, never an answer) suppressed; `generate` adds the `[IMG]` block rule.
        The GILL pipeline's own decoding sets every option itself."""
        lm = getattr(self.language_model, "generation_config", None)
        ids = {name: getattr(lm, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        suppressed = [self.config.image_token_id] if self.config.image_token_id is not None else []
        return GenerationConfig(**{k: v for k, v in ids.items() if v is not None}, suppress_tokens=suppressed or None)

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

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replaces the LM's input embeddings. The LM then no longer matches its backbone reference:
        the model saves in the full form (`form="adapter"` is refused)."""
        self.language_model.set_input_embeddings(value)
        self._mark_backbone_modified("set_input_embeddings")

    def get_output_embeddings(self) -> nn.Module | None:
        return None  # the LM keeps its own head; GILL adds [IMG] columns in `compute_logits`

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resizes the LM's embedding rows (and its head's, when untied) as transformers does; the
        `[IMG]` rows still override their ids. The LM no longer matches its backbone reference: the
        model saves in the full form (`form="adapter"` is refused)."""
        embeddings = self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.text_config.vocab_size = embeddings.weight.shape[0]
        if new_num_tokens is not None and (self.config.vocab_size or 0) < new_num_tokens:
            self.config.vocab_size = new_num_tokens
        self._mark_backbone_modified("resize_token_embeddings")
        return embeddings

    def _mark_backbone_modified(self, how: str) -> None:
        self.config.backbone_references = None  # no reference names this LM any more
        self._backbone_modified_by = how

    # ----- gradient checkpointing ---------------------------------------------------------------

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Recomputes the LM's decoder layers (every `every_n_layers`-th one) in the backward pass
        instead of keeping their activations (kept in host memory with `offload`). transformers
        checkpoints a layer only in training mode, and the frozen LM stays in eval mode (dropout
        off), so GILL wraps the layers itself: non-reentrant checkpoints (the gradient still reaches
        the visual prefix and the `[IMG]` rows through the frozen layers), dropout still off,
        gradients unchanged. transformers' `gradient_checkpointing_enable` (deprecated) and
        `Trainer(activation_checkpointing=True)` arrive here."""
        if every_n_layers < 1:
            raise ValueError(f"`every_n_layers` must be >= 1, got {every_n_layers}.")
        self.activation_checkpointing_disable()
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        for index, layer in enumerate(self._decoder_layers()):
            if index % every_n_layers == 0:
                layer._gill_uncheckpointed_forward = layer.forward
                layer.forward = _CheckpointedForward(layer._gill_uncheckpointed_forward, options, offload)

    def activation_checkpointing_disable(self) -> None:
        for layer in self._decoder_layers():
            if "_gill_uncheckpointed_forward" in layer.__dict__:
                layer.forward = layer.__dict__.pop("_gill_uncheckpointed_forward")

    @property
    def is_activation_checkpointing(self) -> bool:
        return any("_gill_uncheckpointed_forward" in layer.__dict__ for layer in self._decoder_layers())

    def _decoder_layers(self) -> list[nn.Module]:
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in self.language_model.modules() if isinstance(m, GradientCheckpointingLayer)]

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
        img_token_ids = self.img_token_ids
        is_img = torch.isin(input_ids, img_token_ids)
        no_row = (input_ids >= self.num_lm_rows) & ~is_img | (input_ids < 0)
        if no_row.any():
            bad = input_ids[no_row].unique().tolist()
            raise ValueError(
                f"`input_ids` holds ids {bad} that have no embedding row (the LM has {self.num_lm_rows} "
                f"rows; `<|image|>` must be replaced by an image, not fed as a token)."
            )
        if not torch.is_grad_enabled() and not is_img.any():
            # A decoding step's usual case: the LM's rows alone (with gradients on, `img_embeddings`
            # stays in the graph, with zero gradients, as a batch with [IMG] ids would have it).
            return self.get_input_embeddings()(input_ids)
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_img, 0))
        img_slot = (input_ids[..., None] == img_token_ids).float().argmax(-1)
        img_rows = self.img_embeddings.to(embeds.dtype)[img_slot]
        return torch.where(is_img[..., None], img_rows, embeds)

    def compute_logits(self, last_hidden_state: torch.Tensor, lm_logits: torch.Tensor) -> torch.Tensor:
        """Extends the LM's logits with the `[IMG]` columns computed from GILL's output rows."""
        img_logits = last_hidden_state @ self.img_output_rows.to(last_hidden_state.dtype).T
        # One new tensor: the LM's logits padded with -inf (columns without an LM row behind them can
        # never be chosen), the [IMG] columns written into it.
        logits = F.pad(lm_logits, (0, max(self.logits_width - lm_logits.shape[-1], 0)), value=float("-inf"))
        return logits.index_copy_(-1, self.img_token_ids, img_logits.to(logits.dtype))

    # ----- GILL heads ------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """The frozen vision tower's output (`BaseModelOutputWithPooling`, as transformers' vision-language
        models return); GILL's heads read its `pooler_output`, `(n_images, vision_hidden)`. `kwargs`
        (`output_hidden_states`, `output_attentions`) go to the vision tower."""
        if pixel_values.ndim != 4:
            raise ValueError(f"`pixel_values` must be (n_images, channels, height, width), got shape {tuple(pixel_values.shape)}.")
        kwargs.pop("return_dict", None)  # always an output object
        dtype = next(self.vision_model.parameters()).dtype
        return self.vision_model(pixel_values=pixel_values.to(dtype), return_dict=True, **kwargs)

    def _image_features(self, pixel_values, image_features) -> torch.Tensor:
        if (pixel_values is None) == (image_features is None):
            raise ValueError("Pass exactly one of `pixel_values` and `image_features`.")
        return self.get_image_features(pixel_values).pooler_output if image_features is None else image_features

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
        return self._map(img_hidden_states, return_pooled=False)

    def get_decoder_conditioning(self, img_hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """`[IMG]` block states -> every tensor of the decoder spec (`config.decoder_spec`), by name:
        `prompt_embeds` and, for decoders with one, `pooled_prompt_embeds` `(n, pooled_emb_dim)`."""
        prompt_embeds, pooled = self._map(img_hidden_states, return_pooled=True)
        return {"prompt_embeds": prompt_embeds} if pooled is None else {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def _map(self, img_hidden_states: torch.Tensor, return_pooled: bool):
        if img_hidden_states.ndim != 3 or img_hidden_states.shape[1] != self.config.num_img_tokens:
            raise ValueError(
                f"`img_hidden_states` must be (n, {self.config.num_img_tokens}, hidden), got {tuple(img_hidden_states.shape)}."
            )
        dtype = self.mapper.input_proj.weight.dtype
        rows = self.img_embeddings.to(dtype).expand(img_hidden_states.shape[0], -1, -1)
        return self.mapper(img_hidden_states.to(dtype), rows, return_pooled=return_pooled)

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
        gen_pooled_targets: torch.FloatTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
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
          decoder's encodings of each row's caption / target caption, and `gen_pooled_targets`
          `(batch, pooled_emb_dim)` its pooled vectors (decoders with one). The captioning pass runs over
          the paired caption rows; one text pass runs over every row, its CE covering the text (after
          an interleaved row's last image) and `[IMG0]`. Returns [`GillOutput`].
          `concat_captions`: `True` always applies the reference's two-caption concatenation, a float
          in (0, 1) draws it per pass with that probability (torch's RNG); batches holding
          interleaved rows are never concatenated.
        - **decoding**: placeholders are replaced by the visual prefix of `pixel_values` and the LM
          runs once; returns [`GillCausalLMOutputWithPast`]. This is what `generate()` calls.
          `logits_to_keep` (transformers' convention): the logits of the last `logits_to_keep`
          positions only, or of the positions a 1-D tensor names; 0 keeps all. `generate()` asks for 1,
          so a prompt's pass computes no logits it will not read.
        """
        if cache is None and kwargs.get("past_key_values") is not None:
            cache = kwargs.pop("past_key_values")  # transformers' earlier name for the cache
        kwargs.pop("past_key_values", None)
        training_inputs = (gen_targets, interleaved, paired, context_pixel_values, context_image_features, gen_pooled_targets)
        if self._is_decoding_call(input_ids, inputs_embeds, cache, use_cache, training_inputs):
            return self._decoding_forward(
                input_ids, pixel_values, image_features, attention_mask, inputs_embeds, cache, use_cache, logits_to_keep, **kwargs
            )
        if kwargs.get("labels") is not None:
            raise ValueError("`labels` are built by the model from `input_ids`; do not pass them.")
        return training_forward(self, input_ids, pixel_values, image_features, gen_targets, concat_captions,
                                context_pixel_values, context_image_features, interleaved, paired, gen_pooled_targets)

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

    def check_sequence_length(self, length: int) -> None:
        """Raises a `ValueError` when `length` positions (visual prefixes included) exceed the LM's context."""
        context = getattr(self.config.text_config, "max_position_embeddings", None)
        if context is not None and length > context:
            raise ValueError(
                f"The sequence ({length} positions, visual prefixes included) is longer than the LM's context "
                f"of {context}: shorten `input_ids` (GillProcessor(..., max_length=..., truncation=True))."
            )

    def _run_lm(self, inputs_embeds: torch.Tensor, **kwargs):
        cache = kwargs.get("cache")
        self.check_sequence_length(inputs_embeds.shape[1] + (cache.get_seq_length() if cache is not None else 0))
        outputs = self.language_model(inputs_embeds=inputs_embeds, output_hidden_states=True, return_dict=True, **kwargs)
        return outputs, outputs.hidden_states[self.config.text_emb_layers[0]]

    def _decoding_forward(self, input_ids, pixel_values, image_features, attention_mask, inputs_embeds, cache, use_cache,
                          logits_to_keep, **kwargs):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `input_ids` or `inputs_embeds`.")
            inputs_embeds = self.embed_prompt(input_ids, pixel_values, image_features)
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs, _ = self._run_lm(
            inputs_embeds, attention_mask=attention_mask, cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs
        )
        last_hidden = outputs.hidden_states[-1]
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            last_hidden = last_hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            last_hidden = last_hidden[:, logits_to_keep]
        hidden_states = None
        if isinstance(output_hidden_states, (list, tuple)):  # selected layers only
            hidden_states = tuple(outputs.hidden_states[i] for i in output_hidden_states)
        elif output_hidden_states:
            hidden_states = outputs.hidden_states
        output = GillCausalLMOutputWithPast(
            logits=self.compute_logits(last_hidden, outputs.logits),
            cache=getattr(outputs, "cache", None),
            hidden_states=hidden_states,
            attentions=getattr(outputs, "attentions", None),
        )
        return output if return_dict else output.to_tuple()

    # ----- training forward --------------------------------------------------------------------

    # ----- generation --------------------------------------------------------------------------

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_features=None, inputs_embeds=None,
                                      is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds,
                                                             is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_features"] = image_features
        elif self._holds_image_token(model_inputs.get("input_ids")):
            # A generated `<|image|>` (a candidate under the reference's vocabulary when it has an LM
            # row) is a token with its own embedding row here, not a placeholder for an image.
            model_inputs["inputs_embeds"] = self.embed_tokens(model_inputs.pop("input_ids"))
        return model_inputs

    def generate(self, *args, logits_processor=None, **kwargs):
        """`GenerationMixin.generate`. Called without logits processors (as transformers' pipelines
        call it), it follows GILL's block rule: `[IMG0]` is followed by the whole `[IMG1..]` block, which
        is never chosen otherwise, and starts only where the whole block fits in `max_new_tokens`
        (`GillBlockLogitsProcessor`, as `GillPipeline` decodes); GILL's own decoding passes its own."""
        if logits_processor is None:
            max_new_tokens = kwargs.get("max_new_tokens")
            if max_new_tokens is None:
                max_new_tokens = (kwargs.get("generation_config") or self.generation_config).max_new_tokens
            logits_processor = LogitsProcessorList([GillBlockLogitsProcessor(self.config.img_token_ids, max_new_tokens)])
        return super().generate(*args, logits_processor=logits_processor, **kwargs)

    def _holds_image_token(self, input_ids: torch.LongTensor | None) -> bool:
        image_token_id = self.config.image_token_id
        return input_ids is not None and image_token_id is not None and bool((input_ids == image_token_id).any())

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


class GillBlockLogitsProcessor(LogitsProcessor):
    """After `[IMGk]` (k < last) only `[IMGk+1]` can follow; elsewhere `[IMG1..]` cannot be chosen; with
    `max_new_tokens`, `[IMG0]` cannot start a block that would not fit. One instance per `generate` call
    (it counts the new tokens from its first call)."""

    def __init__(self, img_token_ids: list[int], max_new_tokens: int | None = None):
        self.img_token_ids = list(img_token_ids)
        self.max_new_tokens = max_new_tokens
        self._prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = torch.tensor(self.img_token_ids, device=scores.device)
        scores = scores.clone()
        scores[:, ids[1:]] = float("-inf")
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self._prompt_length
        if self.max_new_tokens is not None and generated + len(ids) > self.max_new_tokens:
            scores[:, ids[0]] = float("-inf")  # a block cut by the token limit would be no image
        if input_ids.shape[1] == 0:  # generation from embeddings: nothing generated yet
            return scores
        inside = (input_ids[:, -1:] == ids[:-1]).nonzero()
        for row, k in inside.tolist():
            scores[row] = float("-inf")
            scores[row, ids[k + 1]] = 0.0
        return scores


class _CheckpointedForward:
    """A decoder layer's forward, run under a non-reentrant activation checkpoint when gradients are
    being recorded (plain otherwise)."""

    def __init__(self, forward, options: dict, offload: bool = False):
        self.forward, self.options, self.offload = forward, options, offload

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        if self.offload:  # the checkpoint's saved inputs in (pinned) host memory
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return torch.utils.checkpoint.checkpoint(self.forward, *args, **self.options, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.forward, *args, **self.options, **kwargs)


__all__ = [
    "GillCausalLMOutputWithPast",
    "GillForConditionalGeneration",
    "GillOutput",
    "GillPreTrainedModel",
    "IMAGE_TOKEN",
    "add_gill_tokens",
    "img_token_names",
]
