"""GILL's two heads that are modules of their own: the GILLMapper and the decision head."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .configuration_gill import GillConfig


class GillMapper(nn.Module):
    """GILLMapper: `[IMG]` hidden states (+ `[IMG]` input embeddings) -> Linear -> encoder-decoder
    Transformer over learned queries -> Linear, giving the image decoder's text conditioning."""

    def __init__(self, config: GillConfig):
        super().__init__()
        text_hidden = config.text_config.hidden_size
        width = config.mapper_hidden_size
        self.input_proj = nn.Linear(text_hidden, width)
        # Pre-LN with final norms on both stacks and no masks: decoder self-attention over the
        # queries is bidirectional, exactly as torch's nn.Transformer in the reference.
        with warnings.catch_warnings():  # torch notes that norm_first disables its nested-tensor path
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.transformer = self._build_transformer(config, width)
        self.queries = nn.Parameter(torch.randn(1, config.num_clip_tokens, width))
        self.output_proj = nn.Linear(width, config.gen_emb_dim)
        # Decoders with a pooled vector (SDXL, SD3) take it from another layer or encoder than their
        # sequence, so it is learned, not derived from `output_proj`'s tokens.
        self.pooled_head = GillPooledHead(width, config.mapper_num_heads, config.pooled_emb_dim) if config.pooled_emb_dim else None

    @staticmethod
    def _build_transformer(config: GillConfig, width: int) -> nn.Transformer:
        return nn.Transformer(
            d_model=width,
            nhead=config.mapper_num_heads,
            num_encoder_layers=config.mapper_num_encoder_layers,
            num_decoder_layers=config.mapper_num_decoder_layers,
            dim_feedforward=config.mapper_ffn_dim,
            dropout=config.mapper_dropout,
            batch_first=True,
            norm_first=True,
        )

    def forward(self, img_hidden_states: torch.Tensor, img_embeddings: torch.Tensor,
                return_pooled: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's token conditioning `(batch, num_clip_tokens, gen_emb_dim)`; with `return_pooled`,
        also its pooled vector `(batch, pooled_emb_dim)` (None without a pooled head), from one pass."""
        x = self.input_proj(img_hidden_states + img_embeddings)
        x = self.transformer(x, self.queries.expand(x.shape[0], -1, -1))
        if not return_pooled:
            return self.output_proj(x)
        return self.output_proj(x), (self.pooled_head(x) if self.pooled_head is not None else None)


class GillPooledHead(nn.Module):
    """The decoder's pooled vector from the mapper's output tokens: one learned query attends over
    them (attention pooling), then LayerNorm + Linear to the pooled width."""

    def __init__(self, width: int, num_heads: int, pooled_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, pooled_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.attention(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
        return self.proj(self.norm(pooled[:, 0]))


class GillDecisionHead(nn.Module):
    """Retrieve-or-generate classifier on the `[IMG0]` state (column 0 = generate, 1 = retrieve)."""

    def __init__(self, config: GillConfig):
        super().__init__()
        in_features = config.text_config.hidden_size + (config.decision_head_type == "hidden_and_score")
        self.dropout = nn.Dropout(config.decision_dropout)
        self.linear = nn.Linear(in_features, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))


__all__ = ["GillDecisionHead", "GillMapper", "GillPooledHead"]
