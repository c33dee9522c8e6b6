"""`gill-hf train-retrieval`: GILL's retrieval projections refit at a large contrastive batch.

GILL's InfoNCE loss only sees in-batch negatives. The reference trains at a global batch of 200;
a CPU run of `gill-hf train` affords 16, where few negatives differ from the positive in a single
attribute, so the projections learn coarse matches. After joint training every input of the
retrieval heads is frozen: `text_retrieval_projection` reads the `[IMG0]` state of the frozen LM
(whose `[IMG]` input rows are now fixed) and `image_retrieval_projection` the frozen vision tower's
pooled output. The two projections and `logit_scale` can therefore be refit at the reference's
batch from features computed once, for the cost of one forward pass over the captions.

Nothing else changes: captioning and generation give bitwise the same outputs. A
`"hidden_and_score"` decision head reads the retrieval score, so retrain it afterwards
(`gill-hf train-decision`).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .metrics.functional import retrieval_metrics
from .modeling.training_passes import symmetric_info_nce
from .refit import add_fit_arguments, check_fit_arguments, fit_parameters, load_for_refit, save_refit

# The tensors `fit_retrieval_heads` trains (module or parameter names of GillForConditionalGeneration).
RETRIEVAL_PARAMETERS = ("text_retrieval_projection", "image_retrieval_projection", "logit_scale")


@torch.no_grad()
def img0_states(model, processor, captions: list[str], batch_size: int = 64, max_length: int = 32,
                progress: bool = False) -> torch.Tensor:
    """`(n, hidden)` fp32 `[IMG0]` states of the training rows `[BOS caption [IMG0..7]]` (the
    retrieval pass). Each batch is padded only to its longest row: the LM is causal and rows are
    right-padded, so the states do not depend on the padding."""
    if not captions:
        raise ValueError("`captions` is empty.")
    tokenizer, device = processor.tokenizer, model.img_embeddings.device
    states = []
    for start in tqdm(range(0, len(captions), batch_size), desc="[IMG0] states", unit="batch", disable=not progress):
        batch = captions[start : start + batch_size]
        longest = max(len(tokenizer(c)["input_ids"]) for c in batch) + processor.num_img_tokens
        rows = processor.build_training_inputs(batch, max_length=min(longest, max_length))
        states.append(model(input_ids=rows["input_ids"].to(device)).img_hidden_states[:, 0].float().cpu())
    return torch.cat(states)


@dataclass
class RetrievalFeatures:
    """Frozen inputs of the two retrieval projections, one row per image-caption pair."""

    text_states: torch.Tensor  # (n, text hidden): [IMG0] states
    image_features: torch.Tensor  # (n, vision hidden): pooled vision features

    def __post_init__(self):
        if self.text_states.ndim != 2 or self.image_features.ndim != 2 or len(self.text_states) != len(self.image_features):
            raise ValueError(f"Expected (n, d) text states and (n, d') image features, got {tuple(self.text_states.shape)} "
                             f"and {tuple(self.image_features.shape)}.")

    def __len__(self) -> int:
        return len(self.text_states)


def compute_features(model, processor, dataset, batch_size: int = 64, max_length: int = 32,
                     progress: bool = False) -> RetrievalFeatures:
    """Frozen features of a dataset with `caption` and `image` (or cached `image_features`) columns;
    images that cannot be read are dropped with their captions (`gill_hf.data.cache_image_features`)."""
    from .data import cache_image_features

    if "image_features" not in dataset.column_names:
        dataset = cache_image_features(dataset, model, processor, batch_size=batch_size)
    images = torch.tensor(dataset["image_features"], dtype=torch.float32)
    return RetrievalFeatures(img0_states(model, processor, list(dataset["caption"]), batch_size, max_length, progress), images)


def retrieval_embeds(model, features: RetrievalFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, image) L2-normalised retrieval embeddings through the model's own heads."""
    return (model.get_text_retrieval_embeds(features.text_states),
            model.get_image_retrieval_embeds(image_features=features.image_features))


def contrastive_loss(model, features: RetrievalFeatures) -> torch.Tensor:
    """GILL's symmetric InfoNCE over the given pairs (the batch's negatives are the other pairs)."""
    text, image = retrieval_embeds(model, features)
    return symmetric_info_nce(model.logit_scale.exp() * image @ text.T)


@torch.no_grad()
def evaluate_recall(model, features: RetrievalFeatures) -> dict[str, float]:
    """R@1/R@5 both ways over all pairs of `features` (the eval metrics of `gill-hf train`)."""
    text, image = retrieval_embeds(model, features)
    return retrieval_metrics(text.float(), image.float())


def retrieval_parameters(model) -> list[torch.nn.Parameter]:
    """The tensors named by `RETRIEVAL_PARAMETERS` (a module's parameters, or the parameter itself)."""
    params = []
    for name in RETRIEVAL_PARAMETERS:
        attribute = getattr(model, name)
        params += [attribute] if isinstance(attribute, torch.nn.Parameter) else list(attribute.parameters())
    return params


def check_feature_widths(model, features: RetrievalFeatures, name: str) -> None:
    expected = (model.text_retrieval_projection.in_features, model.image_retrieval_projection.in_features)
    got = (features.text_states.shape[1], features.image_features.shape[1])
    if got != expected:
        raise ValueError(f"`{name}` has (text, image) feature widths {got}; this model's retrieval heads take {expected}.")


@dataclass
class RetrievalFitResult:
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None


def fit_retrieval_heads(model, train: RetrievalFeatures, eval_features: RetrievalFeatures | None = None, *,
                        batch_size: int = 200, steps: int = 2000, learning_rate: float = 1e-3, weight_decay: float = 0.01,
                        warmup_ratio: float = 0.05, max_grad_norm: float = 1.0, seed: int = 0,
                        logging_steps: int = 100, progress: bool = False) -> RetrievalFitResult:
    """Refits `text_retrieval_projection`, `image_retrieval_projection` and `logit_scale` in place
    (`gill_hf.refit.fit_parameters`: the reference's AdamW, clipping 1.0, batches drawn without
    replacement). Unlike the reference's joint run: weight decay on the two matrices only (not on
    biases and `logit_scale`) and linear warm-up + cosine decay (a short fit has no use for the
    10k-step StepLR). No other parameter of `model` is touched."""
    check_fit_arguments(len(train), batch_size, steps, logging_steps, "training pairs")
    for name, features in (("train", train), ("eval_features", eval_features)):
        if features is not None:
            check_feature_widths(model, features, name)
    result = RetrievalFitResult(eval_before=evaluate_recall(model, eval_features) if eval_features is not None else None)

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(model, RetrievalFeatures(train.text_states[index], train.image_features[index]))

    result.losses = fit_parameters(model, retrieval_parameters(model), len(train), batch_loss, batch_size=batch_size,
                                   steps=steps, learning_rate=learning_rate, weight_decay=weight_decay,
                                   warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, seed=seed,
                                   logging_steps=logging_steps, desc="train-retrieval", loss_name="contrastive_loss",
                                   progress=progress)
    if eval_features is not None:
        result.eval_after = evaluate_recall(model, eval_features)
    return result


def _check_arguments(namespace: argparse.Namespace) -> None:
    """Before the feature pass (minutes on a CPU), not after it."""
    minimums = {"batch_size": 2, "steps": 1, "logging_steps": 1, "feature_batch_size": 1, "max_length": 1}
    for name, minimum in minimums.items():
        if getattr(namespace, name) < minimum:
            raise ValueError(f"`--{name}` must be >= {minimum}, got {getattr(namespace, name)}.")
    if namespace.max_train_samples is not None and namespace.max_train_samples < namespace.batch_size:
        raise ValueError(f"`--max_train_samples` ({namespace.max_train_samples}) must be at least `--batch_size` "
                         f"({namespace.batch_size}).")


def run_train_retrieval(namespace: argparse.Namespace) -> dict:
    from .data import load_saved_or_hub_dataset, prepare_hf_dataset
    from .processing_gill import GillProcessor

    _check_arguments(namespace)
    start = time.time()
    model, form = load_for_refit(namespace.model_name_or_path, namespace.backbone_dtype)
    processor = GillProcessor.from_pretrained(namespace.processor_name_or_path or namespace.model_name_or_path)
    if model.config.decision_head_type == "hidden_and_score":
        warnings.warn("The model's 'hidden_and_score' decision head reads the retrieval score, whose scale the refit "
                      "changes: retrain it with `gill-hf train-decision` on the refit model.", stacklevel=2)

    def split(name, limit):
        dataset = prepare_hf_dataset(load_saved_or_hub_dataset(namespace.dataset_name, None, name),
                                     namespace.image_column, namespace.caption_column)
        return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset

    print(f"[train-retrieval] features of {namespace.dataset_name} ({namespace.train_split})", flush=True)
    train = compute_features(model, processor, split(namespace.train_split, namespace.max_train_samples),
                             namespace.feature_batch_size, namespace.max_length, progress=True)
    evaluation = None
    if namespace.eval_split:
        evaluation = compute_features(model, processor, split(namespace.eval_split, None), namespace.feature_batch_size,
                                      namespace.max_length)
    features_s = time.time() - start
    print(f"[train-retrieval] {len(train)} pairs in {features_s:.0f} s; fitting at batch {namespace.batch_size}", flush=True)
    result = fit_retrieval_heads(model, train, evaluation, batch_size=namespace.batch_size, steps=namespace.steps,
                                 learning_rate=namespace.learning_rate, weight_decay=namespace.weight_decay,
                                 seed=namespace.seed, logging_steps=namespace.logging_steps, progress=True)
    metrics = {"model_name_or_path": os.path.abspath(namespace.model_name_or_path), "num_pairs": len(train),
               "batch_size": namespace.batch_size, "steps": namespace.steps, "learning_rate": namespace.learning_rate, "losses": result.losses, "eval_before": result.eval_before,
               "eval_after": result.eval_after, "logit_scale_exp": model.logit_scale.exp().item(),
               "features_s": round(features_s, 1), "wall_s": round(time.time() - start, 1), "form": form}
    save_refit(model, processor, form, namespace.output_dir, "retrieval_metrics.json", metrics)
    return metrics


def register_retrieval_command(subparsers) -> None:
    p = subparsers.add_parser("train-retrieval", help="Refit GILL's retrieval projections at a large contrastive batch "
                                                      "on frozen features (after `gill-hf train`).")
    p.add_argument("--model_name_or_path", required=True, help="GILL checkpoint (full or adapter form).")
    p.add_argument("--processor_name_or_path", default=None, help="GillProcessor folder (default: the checkpoint).")
    p.add_argument("--dataset_name", required=True, help="A `datasets` dataset (name, path or saved folder) with image + caption columns.")
    p.add_argument("--train_split", default="train")
    p.add_argument("--eval_split", default=None, help="Split for R@1/R@5 before and after (all its pairs).")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="caption")
    p.add_argument("--max_train_samples", type=int, default=None, help="Keep the first N training pairs.")
    p.add_argument("--output_dir", required=True, help="Where the model with the refit projections is saved.")
    add_fit_arguments(p, batch_size=200, batch_help="Contrastive batch (reference: global batch 200).", learning_rate=1e-3,
                      learning_rate_help="AdamW learning rate (reference: 1e-3).",
                      weight_decay_help="On the two projection matrices only (the reference's 0.01, which it applies to "
                                        "every tensor).",
                      feature_batch_size=64, max_length_help="Row length cap, [IMG] block included (as in `gill-hf train`).")
    p.set_defaults(func=run_train_retrieval)


__all__ = [
    "RetrievalFeatures",
    "RetrievalFitResult",
    "compute_features",
    "contrastive_loss",
    "evaluate_recall",
    "fit_retrieval_heads",
    "img0_states",
    "register_retrieval_command",
    "run_train_retrieval",
]
