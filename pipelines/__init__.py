"""GILL's diffusers pipeline (importable as `gill_hf.pipelines`)."""

from .pipeline_gill import GillPipeline, GillPipelineOutput, GillUnconditionalEmbedding

__all__ = ["GillPipeline", "GillPipelineOutput", "GillUnconditionalEmbedding"]
