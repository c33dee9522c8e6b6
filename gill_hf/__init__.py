"""gill-hf: GILL (Generating Images with Multimodal Language Models) on Hugging Face libraries.

Importing `gill_hf` registers `GillConfig` (model type "gill_hf"), the model and the processor
with the transformers Auto classes, and installs the backbone resolver and the Hub push. The
pipeline, retrieval index and training classes import diffusers / Trainer, so they load on first
access (`from gill_hf import GillPipeline` works as usual).
"""

import importlib
import importlib.util

import transformers
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from . import embedded  # registers the backbones shipped inside installed packages
from .backbones import register_embedded_backbone, resolve_backbone
from .hub import push_to_hub
from .modeling import GillConfig, GillForConditionalGeneration, GillOutput, add_gill_tokens
from .processing_gill import GillProcessor

AutoConfig.register(GillConfig.model_type, GillConfig, exist_ok=True)
AutoModel.register(GillConfig, GillForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(GillConfig, GillForConditionalGeneration, exist_ok=True)
AutoProcessor.register(GillConfig, GillProcessor, exist_ok=True)
GillForConditionalGeneration.backbone_resolver = staticmethod(resolve_backbone)
GillForConditionalGeneration.hub_pusher = staticmethod(push_to_hub)


def _resolve_image_processors_quietly() -> None:
    # Without torchvision (which a CPU install must not have: its CUDA-only wheels break `import
    # diffusers`), transformers falls back to `<Model>ImageProcessorPil` and says "install torchvision"
    # on first use; resolving the names GILL's parts use (CLIP; SigLIP, which diffusers' Stable
    # Diffusion import touches) once, quietly, keeps that contradicting hint off every load.
    if importlib.util.find_spec("torchvision") is None:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            for name in ("CLIPImageProcessor", "SiglipImageProcessor"):
                getattr(transformers, name)
        finally:
            transformers.logging.set_verbosity(verbosity)


_resolve_image_processors_quietly()

__version__ = "0.1.0"

_LAZY = {
    "GillPipeline": "gill_hf.pipelines",
    "GillPipelineOutput": "gill_hf.pipelines",
    "GillSD3Pipeline": "gill_hf.pipelines",
    "GillXLPipeline": "gill_hf.pipelines",
    "GillRetrievalIndex": "gill_hf.retrieval",
    "GillTrainer": "gill_hf.training",
    "GillTrainingArguments": "gill_hf.training",
    "GillDataCollator": "gill_hf.data",
    "load_gill_tiny_pipeline": "gill_hf.world.gill_tiny",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gill_hf' has no attribute {name!r}")


__all__ = [
    "GillConfig",
    "GillDataCollator",
    "GillForConditionalGeneration",
    "GillOutput",
    "GillPipeline",
    "GillPipelineOutput",
    "GillProcessor",
    "GillRetrievalIndex",
    "GillSD3Pipeline",
    "GillTrainer",
    "GillTrainingArguments",
    "GillXLPipeline",
    "add_gill_tokens",
    "load_gill_tiny_pipeline",
    "push_to_hub",
    "register_embedded_backbone",
    "resolve_backbone",
]
