"""Metric functions shared by `GillTrainer` (called directly, no module loading) and the local
`evaluate` modules in this folder (which wrap them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def recall_at_k(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Row i's correct column is i; returns the share of rows whose correct column ranks in the top k.
    Ties count against the row (every other column scoring at least as high ranks first), so a
    constant similarity scores 0, never 1."""
    correct = similarity.diagonal()[:, None]
    rank = (similarity >= correct).sum(dim=1) - 1  # other columns at least as good as the right one
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval_metrics(text_embeds: torch.Tensor, image_embeds: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Text->image and image->text recall@k over paired rows (the reference's validation:
    cosine similarity between the `[IMG0]` retrieval embedding and the image's)."""
    if text_embeds.shape != image_embeds.shape or text_embeds.ndim != 2 or text_embeds.shape[0] == 0:
        raise ValueError(
            f"`text_embeds` and `image_embeds` must be paired (n, dim) tensors, got {tuple(text_embeds.shape)} "
            f"and {tuple(image_embeds.shape)}."
        )
    similarity = F.normalize(text_embeds.float(), dim=-1) @ F.normalize(image_embeds.float(), dim=-1).T
    t2i, i2t = recall_at_k(similarity, ks), recall_at_k(similarity.T, ks)
    return {**{f"t2i_r{k}": v for k, v in t2i.items()}, **{f"i2t_r{k}": v for k, v in i2t.items()}}


def generation_l2(prompt_embeds: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over examples and positions of the per-token L2 distance (GILL's generation loss)."""
    if prompt_embeds.shape != targets.shape or prompt_embeds.ndim != 3:
        raise ValueError(f"Expected two (n, tokens, dim) tensors of one shape, got {tuple(prompt_embeds.shape)} and {tuple(targets.shape)}.")
    return (prompt_embeds.float() - targets.float()).pow(2).sum(-1).sqrt().mean().item()


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int = 2) -> float:
    """Unweighted mean over classes of F1 (a class absent from both gives F1 1, as torchmetrics' 0/0
    handling would not count it; here it is skipped)."""
    scores = []
    for c in range(num_classes):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
