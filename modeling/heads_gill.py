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

    def forward(self, img_hidden_states: torch.Tensor, img_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(img_hidden_states + img_embeddings)
        x = self.transformer(x, self.queries.expand(x.shape[0], -1, -1))
        return self.output_proj(x)


class GillDecisionHead(nn.Module):
    """Retrieve-or-generate classifier on the `[IMG0]` state (column 0 = generate, 1 = retrieve)."""

    def __init__(self, config: GillConfig):
        super().__init__()
        in_features = config.text_config.hidden_size + (config.decision_head_type == "hidden_and_score")
        self.dropout = nn.Dropout(config.decision_dropout)
        self.linear = nn.Linear(in_features, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))


__all__ = ["GillDecisionHead", "GillMapper"]
