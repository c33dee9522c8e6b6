"""Configuration of GILL: a frozen causal LM and a frozen vision tower joined by small trained heads."""

from __future__ import annotations

import math
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

DECISION_HEAD_TYPES = ("hidden", "hidden_and_score")
# Image-decoder families GILL can condition, with the pooled conditioning each one takes besides its
# token sequence: SD 1.x/2.x none, SDXL text_encoder_2's projected vector, SD3 both CLIPs' vectors.
DECODER_FAMILIES = {"stable-diffusion": False, "stable-diffusion-xl": True, "stable-diffusion-3": True}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class GillConfig(PreTrainedConfig):
    r"""
    Configuration of a [`GillForConditionalGeneration`]. The defaults are the released GILL model
    (OPT-6.7B + CLIP ViT-L/14 + a Stable Diffusion v1.5 text space).

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the frozen causal LM (any model type whose last hidden state and input
            embeddings share a width). Defaults to OPT-6.7B's sizes.
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the frozen vision tower; its `pooler_output` feeds the GILL heads. Defaults
            to CLIP ViT-L/14's vision tower.
        num_visual_tokens (`int`, defaults to 4):
            LM input vectors produced per image by the visual prefix (`Linear(vision, text * n)`).
        num_img_tokens (`int`, defaults to 8):
            Number of `[IMG]` tokens appended to a caption (`[IMG0]`..`[IMG{n-1}]`).
        img_token_ids (`list[int]`, *optional*):
            Token ids of `[IMG0]`.. in order; set from the processor's tokenizer.
        image_token_id (`int`, *optional*):
            Token id of `<|image|>`, the placeholder the processor writes where an image's visual
            prefix goes.
        vocab_size (`int`, *optional*):
            Number of ids the tokenizer produces, the added GILL tokens included. LM rows at or
            beyond it (padding rows) are never decoded.
        ret_emb_dim (`int`, defaults to 256): width of the shared retrieval space.
        gen_emb_dim (`int`, defaults to 768): width of the image decoder's text conditioning.
        num_clip_tokens (`int`, defaults to 77): sequence length of the decoder's text conditioning.
        decoder_family (`str`, defaults to `"stable-diffusion"`): the image decoder's family
            (`"stable-diffusion"` for SD 1.x/2.x, `"stable-diffusion-xl"`, `"stable-diffusion-3"`);
            with the two fields above and `pooled_emb_dim` it is the decoder spec
            ([`~GillConfig.decoder_spec`], derived from a decoder folder by
            `gill_hf.decoders.decoder_spec`).
        pooled_emb_dim (`int`, *optional*): width of the decoder's pooled text conditioning (SDXL:
            1280, SD3: 2048); the mapper then grows an attention-pool head for it. `None` for SD 1.x/2.x.
        pooled_loss_scale (`float`, defaults to 1.0): weight of the pooled head's L2 distance in `gen_loss`.
        mapper_hidden_size, mapper_num_heads, mapper_num_encoder_layers, mapper_num_decoder_layers,
        mapper_ffn_dim, mapper_dropout: the GILLMapper transformer (reference: 512, 4, 4, 4, 2048, 0.0).
        text_emb_layers (`list[int]`, defaults to `[-1]`):
            LM hidden layer whose `[IMG]` states feed the heads (`-1`: the last one, after the LM's
            final norm). The reference's inference reads exactly one layer; so does this model.
        decision_head_type (`str`, *optional*):
            `None` (no decision head: images are generated), `"hidden"` (`Linear(hidden, 2)` on the
            `[IMG0]` state, the repository's head) or `"hidden_and_score"` (`Linear(hidden + 1, 2)`
            on `[IMG0]` state and the best scaled retrieval score, the paper-era head).
        decision_dropout (`float`, defaults to 0.5): dropout before the decision head's linear layer.
        caption_loss_scale, text_loss_scale, contrastive_loss_scale, gen_loss_scale (`float`, 1.0):
            weights of the loss components (the reference's are all 1.0).
        contrastive_gather (`str`, defaults to `"reference"`): how the contrastive loss gathers negatives
            across processes: `"reference"` (gradient through the local slice only, as the original
            code) or `"autograd"` (`torch.distributed.nn`; DDP's averaged gradient then equals a single
            process's on the concatenated batch).
        concat_captions_prob (`float`, defaults to 0.5):
            Probability, per pass, of the reference's two-caption concatenation augmentation when
            training (the trainer passes it to `forward`).
        logit_scale_init_value (`float`, defaults to `log(1 / 0.07)`): initial contrastive temperature.
        freeze_lm, freeze_vm (`bool`, defaults to `True`): keep the LM / vision tower frozen.
        backbone_references (`dict`, *optional*):
            For the adapter checkpoint form: `{"text_model": ref, "vision_model": ref}`, each ref a
            dict naming exactly one backbone (`{"repo_id", "revision"}`, `{"path"}` or
            `{"embedded", "sha256"}`).

    Example:

    ```python
    >>> from gill_hf import GillConfig
    >>> config = GillConfig()  # the released GILL's sizes
    >>> config.text_config.hidden_size, config.vision_config.hidden_size
    (4096, 1024)
    ```"""

    model_type = "gill_hf"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="opt",
            init_kwargs={
                "hidden_size": 4096,
                "word_embed_proj_dim": 4096,
                "ffn_dim": 16384,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "vocab_size": 50272,
                "max_position_embeddings": 2048,
            },
        ),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 224,
                "projection_dim": 768,
            },
        ),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    num_visual_tokens: int = 4
    num_img_tokens: int = 8
    img_token_ids: list[int] | None = None
    image_token_id: int | None = None
    vocab_size: int | None = None
    ret_emb_dim: int = 256
    gen_emb_dim: int = 768
    num_clip_tokens: int = 77
    decoder_family: str = "stable-diffusion"
    pooled_emb_dim: int | None = None
    pooled_loss_scale: float = 1.0
    mapper_hidden_size: int = 512
    mapper_num_heads: int = 4
    mapper_num_encoder_layers: int = 4
    mapper_num_decoder_layers: int = 4
    mapper_ffn_dim: int = 2048
    mapper_dropout: float = 0.0
    text_emb_layers: list[int] | None = None
    decision_head_type: Literal["hidden", "hidden_and_score"] | None = None
    decision_dropout: float = 0.5
    caption_loss_scale: float = 1.0
    text_loss_scale: float = 1.0
    contrastive_loss_scale: float = 1.0
    gen_loss_scale: float = 1.0
    contrastive_gather: Literal["reference", "autograd"] = "reference"
    concat_captions_prob: float = 0.5
    logit_scale_init_value: float = math.log(1 / 0.07)
    freeze_lm: bool = True
    freeze_vm: bool = True
    backbone_references: dict | None = None
    tie_word_embeddings: bool = False  # the composite ties nothing itself; the LM keeps its own tying

    def __post_init__(self, **kwargs):
        if self.text_emb_layers is None:
            self.text_emb_layers = [-1]
        super().__post_init__(**kwargs)
        self._validate_gill_fields()

    def _validate_gill_fields(self) -> None:
        positive = (
            "num_visual_tokens", "num_img_tokens", "ret_emb_dim", "gen_emb_dim", "num_clip_tokens",
            "mapper_hidden_size", "mapper_num_heads", "mapper_num_encoder_layers",
            "mapper_num_decoder_layers", "mapper_ffn_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.mapper_hidden_size % self.mapper_num_heads:
            raise ValueError(
                f"`mapper_hidden_size` ({self.mapper_hidden_size}) must be divisible by "
                f"`mapper_num_heads` ({self.mapper_num_heads})."
            )
        if not isinstance(self.text_emb_layers, (list, tuple)) or len(self.text_emb_layers) != 1:
            raise ValueError(
                f"`text_emb_layers` must name exactly one LM layer (as the reference's inference "
                f"does), got {self.text_emb_layers!r}."
            )
        if self.decision_head_type not in (None, *DECISION_HEAD_TYPES):
            raise ValueError(
                f"`decision_head_type` must be None or one of {DECISION_HEAD_TYPES}, "
                f"got {self.decision_head_type!r}."
            )
        self._validate_token_ids()
        layers = getattr(self.text_config, "num_hidden_layers", None)
        layer = self.text_emb_layers[0]
        if not _is_int(layer) or (layers is not None and not -(layers + 1) <= layer <= layers):
            raise ValueError(
                f"`text_emb_layers` must name a hidden-state index of the LM (-{(layers or 0) + 1}..{layers}), got {self.text_emb_layers!r}."
            )
        if self.decoder_family not in DECODER_FAMILIES:
            raise ValueError(f"`decoder_family` must be one of {sorted(DECODER_FAMILIES)}, got {self.decoder_family!r}.")
        if DECODER_FAMILIES[self.decoder_family] != (self.pooled_emb_dim is not None):
            raise ValueError(f"A {self.decoder_family!r} decoder {'takes' if DECODER_FAMILIES[self.decoder_family] else 'takes no'} "
                             f"pooled conditioning; got `pooled_emb_dim`={self.pooled_emb_dim!r}.")
        if self.pooled_emb_dim is not None and (not _is_int(self.pooled_emb_dim) or self.pooled_emb_dim <= 0):
            raise ValueError(f"`pooled_emb_dim` must be None or a positive integer, got {self.pooled_emb_dim!r}.")
        if self.contrastive_gather not in ("reference", "autograd"):
            raise ValueError(f"`contrastive_gather` must be 'reference' or 'autograd', got {self.contrastive_gather!r}.")
        if not 0.0 <= self.concat_captions_prob <= 1.0:
            raise ValueError(f"`concat_captions_prob` must lie in [0, 1], got {self.concat_captions_prob!r}.")

    def _validate_token_ids(self) -> None:
        """Ids that would break the model later (a logits row of 1e9 columns, `<|image|>` taken for
        `[IMG0]`) are refused when the config is built or loaded."""
        if self.vocab_size is not None and (not _is_int(self.vocab_size) or self.vocab_size <= 0):
            raise ValueError(f"`vocab_size` must be a positive integer, got {self.vocab_size!r}.")
        lm_rows = getattr(self.text_config, "vocab_size", None) or 0
        limit = self.vocab_size if self.vocab_size is not None else lm_rows + self.num_img_tokens + 1
        ids = [("img_token_ids", i) for i in (self.img_token_ids or [])]
        if self.image_token_id is not None:
            ids.append(("image_token_id", self.image_token_id))
        for name, value in ids:
            if not _is_int(value) or not 0 <= value < limit:
                raise ValueError(f"`{name}` holds {value!r}; ids must be integers in [0, {limit}) (the tokenizer's size).")
        if self.img_token_ids is not None:
            if len(self.img_token_ids) != self.num_img_tokens:
                raise ValueError(
                    f"`img_token_ids` must hold `num_img_tokens`={self.num_img_tokens} ids, "
                    f"got {len(self.img_token_ids)}."
                )
            if len(set(self.img_token_ids)) != len(self.img_token_ids):
                raise ValueError(f"`img_token_ids` must be distinct, got {self.img_token_ids!r}.")
            if self.image_token_id in self.img_token_ids:
                raise ValueError(f"`image_token_id` ({self.image_token_id}) must differ from every `img_token_ids` id.")

    @property
    def decoder_spec(self) -> dict:
        """The conditioning the image decoder takes, as `{"family", "tensors": {name: shape}}` (shapes
        without the batch dimension); what the mapper's heads produce and `gen_targets` hold."""
        tensors = {"prompt_embeds": [self.num_clip_tokens, self.gen_emb_dim]}
        if self.pooled_emb_dim is not None:
            tensors["pooled_prompt_embeds"] = [self.pooled_emb_dim]
        return {"family": self.decoder_family, "tensors": tensors}

    @property
    def lm_ties_embeddings(self) -> bool:
        """Whether the LM's output rows are its input rows (then one set of [IMG] rows serves both)."""
        return bool(getattr(self.text_config, "tie_word_embeddings", False))


__all__ = ["DECODER_FAMILIES", "GillConfig"]
