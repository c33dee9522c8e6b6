"""Tiny random image decoders of each family GILL supports, built in code (no hub): SD 1.x-shaped (in
test_pipeline), SD 2.x-shaped, SDXL (two CLIP text encoders, micro-conditioned UNet) and SD3 (two CLIPs + T5,
an MMDiT transformer, flow matching). Tokenizers are the BPEs of `tiny_tokenizers`."""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tiny_tokenizers import opt_like_tokenizer

CLIP_LENGTH = 6  # the CLIP tokenizers' model_max_length
XL_WIDTHS, XL_POOLED, XL_TIME_DIM = (8, 12), 10, 4
SD3_CLIP_WIDTH, SD3_T5_WIDTH, SD3_T5_LENGTH = 6, 16, 5


def clip_tokenizer(tmp_path, max_length: int = CLIP_LENGTH):
    tokenizer = opt_like_tokenizer(tmp_path)
    tokenizer.model_max_length = max_length
    return tokenizer


def clip_text(hidden: int, projection: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def tiny_vae(seed: int = 0, **extra) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16, layers_per_block=1, **extra).eval()


def tiny_sd2_pipeline(tmp_path) -> StableDiffusionPipeline:
    """SD 2.x's shape: a wider OpenCLIP-like text encoder, linear-projection attention with per-block
    head sizes, v-prediction."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4,
    ).eval()
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text(24, seed=1), tokenizer=clip_tokenizer(tmp_path), unet=unet,
                                   scheduler=DDIMScheduler(prediction_type="v_prediction"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sdxl_pipeline(tmp_path, force_zeros_for_empty_prompt: bool = True) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(XL_WIDTHS), attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * XL_TIME_DIM + XL_POOLED,
    ).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), unet=unet, scheduler=scheduler, text_encoder=clip_text(XL_WIDTHS[0], seed=1),
        text_encoder_2=clip_text(XL_WIDTHS[1], XL_POOLED, seed=2), tokenizer=clip_tokenizer(tmp_path),
        tokenizer_2=clip_tokenizer(tmp_path), force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )


def tiny_sd3_pipeline(tmp_path) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=SD3_T5_WIDTH, caption_projection_dim=8, pooled_projection_dim=2 * SD3_CLIP_WIDTH, out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(vocab_size=300, d_model=SD3_T5_WIDTH, d_ff=32, d_kv=4, num_layers=1, num_heads=2,
                                 pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)).eval()
    return StableDiffusion3Pipeline(
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=clip_text(SD3_CLIP_WIDTH, SD3_CLIP_WIDTH, seed=1),
        text_encoder_2=clip_text(SD3_CLIP_WIDTH, SD3_CLIP_WIDTH, seed=2), text_encoder_3=t5, tokenizer=clip_tokenizer(tmp_path),
        tokenizer_2=clip_tokenizer(tmp_path), tokenizer_3=clip_tokenizer(tmp_path, max_length=64),
    )
