"""Tiny random GILL models built in code (no hub): OPT (tied), Llama (untied), GPT-2 (tied)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, GPT2Config, LlamaConfig, OPTConfig

from gill_hf import GillConfig, GillForConditionalGeneration

HIDDEN = 32
TOKENIZER_SIZE = 300  # entries before GILL adds `<|image|>` and 8 [IMG] tokens
IMAGE_TOKEN_ID = TOKENIZER_SIZE
IMG_TOKEN_IDS = list(range(TOKENIZER_SIZE + 1, TOKENIZER_SIZE + 9))
BOS_ID = 2

# LM rows per kind: OPT has a few more rows than its tokenizer (50272 vs 50265), GPT-2 exactly as
# many, and the Llama-like one many more (rows that no tokenizer entry maps to).
LM_ROWS = {"opt": 305, "gpt2": TOKENIZER_SIZE, "llama": 320}


def text_config(kind: str):
    rows = LM_ROWS[kind]
    if kind == "opt":
        return OPTConfig(vocab_size=rows, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                         bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=1)
    if kind == "llama":
        return LlamaConfig(vocab_size=rows, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=3, pad_token_id=None)
    if kind == "gpt2":
        return GPT2Config(vocab_size=rows, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=128,
                          bos_token_id=BOS_ID, eos_token_id=BOS_ID)
    raise ValueError(kind)


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8)


def gill_config(kind: str = "opt", **overrides) -> GillConfig:
    fields = dict(
        text_config=text_config(kind), vision_config=vision_config(), img_token_ids=IMG_TOKEN_IDS,
        image_token_id=IMAGE_TOKEN_ID, vocab_size=TOKENIZER_SIZE + 9, ret_emb_dim=16, gen_emb_dim=20,
        num_clip_tokens=6, mapper_hidden_size=16, mapper_num_heads=2, mapper_num_encoder_layers=1,
        mapper_num_decoder_layers=1, mapper_ffn_dim=32,
    )
    fields.update(overrides)
    return GillConfig(**fields)


def tiny_gill(kind: str = "opt", seed: int = 0, **overrides) -> GillForConditionalGeneration:
    torch.manual_seed(seed)
    return GillForConditionalGeneration(gill_config(kind, **overrides)).eval()


def training_batch(batch: int = 4, length: int = 16, seed: int = 0):
    """Rows `[BOS caption [IMG0..7] pad]` with captions of different lengths, images and targets."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        n_caption = 2 + (3 * i) % (length - 10)
        caption = torch.randint(4, TOKENIZER_SIZE, (n_caption,), generator=generator).tolist()
        row = [BOS_ID] + caption + IMG_TOKEN_IDS
        rows.append(row + [1] * (length - len(row)))
    input_ids = torch.tensor(rows)
    attention_mask = (torch.arange(length)[None] < torch.tensor([len(r) - r.count(1) for r in rows])[:, None]).long()
    pixel_values = torch.rand(batch, 3, 32, 32, generator=generator)
    gen_targets = torch.randn(batch, 6, 20, generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, gen_targets=gen_targets)
