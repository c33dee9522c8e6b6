"""gill-hf: GILL (Generating Images with Multimodal Language Models) on Hugging Face libraries.

Importing `gill_hf` registers `GillConfig` (model type "gill_hf"), the model and the processor
with the transformers Auto classes, and installs the backbone resolver.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from . import embedded  # registers the backbones shipped inside installed packages
from .backbones import register_embedded_backbone, resolve_backbone
from .modeling import GillConfig, GillForConditionalGeneration, GillOutput, add_gill_tokens
from .processing_gill import GillProcessor

AutoConfig.register(GillConfig.model_type, GillConfig, exist_ok=True)
AutoModel.register(GillConfig, GillForConditionalGeneration, exist_ok=True)
AutoProcessor.register(GillConfig, GillProcessor, exist_ok=True)
GillForConditionalGeneration.backbone_resolver = staticmethod(resolve_backbone)

__version__ = "0.1.0"

__all__ = [
    "GillConfig",
    "GillForConditionalGeneration",
    "GillOutput",
    "GillProcessor",
    "add_gill_tokens",
    "register_embedded_backbone",
    "resolve_backbone",
]
