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


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of `a` with row i of `b` (e.g. CLIP embeddings of a generated and
    the real image: the paper's VIST / VisDial generation metric)."""
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"Expected two paired (n, dim) tensors, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def retrieval_ranks(queries: torch.Tensor, pool: torch.Tensor, targets: list[int] | torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's target among the pool by cosine similarity (ties count against
    the query, as in `recall_at_k`)."""
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(pool.float(), dim=-1).T
    targets = torch.as_tensor(targets, dtype=torch.long)
    correct = similarity.gather(1, targets[:, None])
    return (similarity >= correct).sum(dim=1) - 1


def recall_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    return {f"r@{k}": (ranks < k).float().mean().item() for k in ks}


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are
    Inception-v3 pool features): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2). The square root's
    trace is the sum of the square roots of the eigenvalues of S_a S_b."""
    a, b = features_a.double(), features_b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"Expected two (n >= 2, dim) feature sets of one width, got {tuple(a.shape)} and {tuple(b.shape)}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # torch.cov of one feature is 0-d
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * eigenvalues.sqrt().sum()).item()
