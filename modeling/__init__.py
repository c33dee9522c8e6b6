"""GILL's configuration and model (importable as `gill_hf.modeling`)."""

from .configuration_gill import GillConfig
from .heads_gill import GillDecisionHead, GillMapper
from .modeling_gill import (
    GillCausalLMOutputWithPast,
    GillForConditionalGeneration,
    GillOutput,
    GillPreTrainedModel,
    IMAGE_TOKEN,
    add_gill_tokens,
    img_token_names,
)

__all__ = [
    "GillCausalLMOutputWithPast",
    "GillConfig",
    "GillDecisionHead",
    "GillForConditionalGeneration",
    "GillMapper",
    "GillOutput",
    "GillPreTrainedModel",
    "IMAGE_TOKEN",
    "add_gill_tokens",
    "img_token_names",
]
