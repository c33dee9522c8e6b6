"""GILL's diffusers pipelines (importable as `gill_hf.pipelines`): one per image-decoder family."""

from .components_gill import GillPipelineOutput, GillUnconditionalEmbedding
from .pipeline_gill import GillPipeline
from .pipeline_gill_decoders import GillSD3Pipeline, GillXLPipeline

# The GILL pipeline of each decoder family (`gill_hf.decoders`), as `from_sd_and_gill` picks it.
PIPELINE_CLASSES = {"stable-diffusion": GillPipeline, "stable-diffusion-xl": GillXLPipeline, "stable-diffusion-3": GillSD3Pipeline}

__all__ = ["PIPELINE_CLASSES", "GillPipeline", "GillPipelineOutput", "GillSD3Pipeline", "GillUnconditionalEmbedding", "GillXLPipeline"]
