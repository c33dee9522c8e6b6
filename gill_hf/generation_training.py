"""`gill-hf train-generation`: GILL's generation mapper refit on frozen `[IMG]` states.

GILL's generation loss trains the mapper (`GillMapper`) on the states of the `[IMG0..7]` block. Those
states come from the frozen LM (with its LoRA, if any) reading the `[IMG]` input rows, so during
joint training they move while the mapper learns, and a CPU run shows the mapper each row once or
twice. After `gill-hf train` they are fixed: this command computes the block states of every row
once (one forward pass, caption rows and interleaved rows alike) and refits the mapper alone on them
for as many epochs as it needs, with GILL's generation loss against the rows' targets (`gill-hf
precompute-targets`).

Only the mapper changes: text, captions, retrieval and the decision head give bitwise the same
outputs (the `[IMG]` input rows, which the mapper also reads, are LM inputs and stay fixed).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .modeling.training_passes import generation_loss
from .refit import add_fit_arguments, check_fit_arguments, fit_parameters, load_for_refit, save_refit

# The module `fit_generation_mapper` trains (of GillForConditionalGeneration).
GENERATION_PARAMETERS = ("mapper",)
# What a collator batch carries for the other losses only: the paired image feeds the contrastive loss.
_NOT_FOR_THE_BLOCK = ("pixel_values", "image_features", "paired", "stream_state")


@dataclass
class GenerationFeatures:
    """Frozen inputs of the mapper and its targets, one row per training row."""

    states: torch.Tensor  # (n, num_img_tokens, hidden): the [IMG] block's states
    targets: torch.Tensor  # (n, num_clip_tokens, gen_emb_dim)
    pooled_targets: torch.Tensor | None = None  # (n, pooled_emb_dim), decoders with a pooled vector

    def __post_init__(self):
        if self.states.ndim != 3 or self.targets.ndim != 3 or len(self.states) != len(self.targets):
            raise ValueError(f"Expected (n, tokens, hidden) states and (n, tokens, dim) targets, got "
                             f"{tuple(self.states.shape)} and {tuple(self.targets.shape)}.")
        if self.pooled_targets is not None and len(self.pooled_targets) != len(self.states):
            raise ValueError(f"{len(self.pooled_targets)} pooled targets for {len(self.states)} rows.")

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index) -> GenerationFeatures:
        pooled = self.pooled_targets[index] if self.pooled_targets is not None else None
        return GenerationFeatures(self.states[index], self.targets[index], pooled)

    @classmethod
    def cat(cls, parts: list[GenerationFeatures]) -> GenerationFeatures:
        pooled = [p.pooled_targets for p in parts]
        return cls(torch.cat([p.states for p in parts]), torch.cat([p.targets for p in parts]),
                   torch.cat(pooled) if all(p is not None for p in pooled) else None)


@torch.no_grad()
def block_states(model, collator, dataset, batch_size: int = 32, progress: bool = False) -> GenerationFeatures:
    """The `[IMG]` block states and targets of `dataset`'s rows, built by `collator` (a
    `GillDataCollator`: caption rows, interleaved rows or both) exactly as `gill-hf train` builds them,
    without the two-caption concatenation (a generated image's block never follows another caption).
    Rows the collator skips (unreadable image or target) are left out with their targets. States do
    not depend on the batch: rows are right-padded and the LM is causal."""
    device = model.img_embeddings.device
    target_columns = [c for c in ("gen_targets", "gen_pooled_targets") if c in (getattr(dataset, "column_names", None) or ())]
    if target_columns:  # as arrays: Arrow's nested lists become Python floats otherwise, seconds per batch
        dataset = dataset.with_format("numpy", columns=target_columns, output_all_columns=True)
    parts = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="[IMG] block states", unit="batch", disable=not progress):
        columns = dataset[start : start + batch_size]
        batch = collator([dict(zip(columns, values)) for values in zip(*columns.values())])
        if "gen_targets" not in batch:
            raise ValueError("`train-generation` rows need generation targets (`gill-hf precompute-targets`).")
        targets, pooled = batch.pop("gen_targets").float(), batch.pop("gen_pooled_targets", None)
        inputs = {k: v.to(device) for k, v in batch.items() if k not in _NOT_FOR_THE_BLOCK}
        states = model(**inputs, concat_captions=0.0).img_hidden_states.float().cpu()
        parts.append(GenerationFeatures(states, targets, pooled.float() if pooled is not None else None))
    if not parts:
        raise ValueError("The dataset has no rows.")
    return GenerationFeatures.cat(parts)


def mapper_loss(model, features: GenerationFeatures) -> torch.Tensor:
    """GILL's generation loss (the training forward's `gen_loss`) of the mapper on these rows."""
    conditioning = model.get_decoder_conditioning(features.states.to(model.img_embeddings.device))
    device = conditioning["prompt_embeds"].device
    pooled = features.pooled_targets.to(device) if features.pooled_targets is not None else None
    return generation_loss(conditioning, features.targets.to(device), pooled, model.config.pooled_loss_scale)[0]


@torch.no_grad()
def evaluate_generation(model, features: GenerationFeatures, batch_size: int = 256) -> float:
    """The generation loss over all rows of `features` (row-weighted mean of batches)."""
    total = 0.0
    for start in range(0, len(features), batch_size):
        part = features[start : start + batch_size]
        total += mapper_loss(model, part).item() * len(part)
    return total / len(features)


def check_feature_widths(model, features: GenerationFeatures, name: str) -> None:
    config = model.config
    expected = ((config.num_img_tokens, model.img_embeddings.shape[1]), (config.num_clip_tokens, config.gen_emb_dim))
    got = (tuple(features.states.shape[1:]), tuple(features.targets.shape[1:]))
    if got != expected:
        raise ValueError(f"`{name}` has (states, targets) row shapes {got}; this model's mapper maps {expected[0]} to "
                         f"{expected[1]}.")
    if (config.pooled_emb_dim is not None) != (features.pooled_targets is not None):
        raise ValueError(f"`{name}`: a decoder with a pooled vector needs `pooled_targets`, others none "
                         f"(model pooled_emb_dim={config.pooled_emb_dim}).")


@dataclass
class GenerationFitResult:
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None


def fit_generation_mapper(model, train: GenerationFeatures, eval_features: dict[str, GenerationFeatures] | None = None,
                          *, batch_size: int = 64, steps: int = 2000, learning_rate: float = 1e-4,
                          weight_decay: float = 0.01, warmup_ratio: float = 0.05, max_grad_norm: float = 1.0,
                          seed: int = 0, logging_steps: int = 100, progress: bool = False) -> GenerationFitResult:
    """Refits `model.mapper` in place on `train` with GILL's generation loss (`gill_hf.refit.fit_parameters`:
    the reference's AdamW, clipping, warm-up + cosine decay). `eval_features` maps names (e.g. caption /
    interleaved validation) to held-out rows, whose loss is reported before and after. The mapper is in
    train mode during the fit (its dropout applies) and back in its previous mode after."""
    check_fit_arguments(len(train), batch_size, steps, logging_steps, "training rows")
    eval_features = eval_features or {}
    for name, features in (("train", train), *eval_features.items()):
        check_feature_widths(model, features, name)

    def evaluate() -> dict[str, float] | None:
        return {name: evaluate_generation(model, f) for name, f in eval_features.items()} or None

    result = GenerationFitResult(eval_before=evaluate())
    was_training = model.mapper.training
    model.mapper.train()
    try:
        result.losses = fit_parameters(model, list(model.mapper.parameters()), len(train),
                                       lambda index: mapper_loss(model, train[index]), batch_size=batch_size,
                                       steps=steps, learning_rate=learning_rate, weight_decay=weight_decay,
                                       warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, seed=seed,
                                       logging_steps=logging_steps, desc="train-generation", loss_name="gen_loss",
                                       progress=progress)
    finally:
        model.mapper.train(was_training)
    result.eval_after = evaluate()
    return result


def _check_arguments(namespace: argparse.Namespace) -> None:
    """Before the state pass (minutes on a CPU), not after it."""
    if not namespace.dataset_name and not namespace.interleaved_dataset_name:
        raise ValueError("Pass `--dataset_name` (caption rows), `--interleaved_dataset_name` (interleaved rows) or both.")
    minimums = {"batch_size": 2, "steps": 1, "logging_steps": 1, "feature_batch_size": 1, "max_length": 1,
                "interleaved_max_length": 1}
    for name, minimum in minimums.items():
        if getattr(namespace, name) < minimum:
            raise ValueError(f"`--{name}` must be >= {minimum}, got {getattr(namespace, name)}.")
    for name in ("max_train_samples", "max_interleaved_samples"):
        if getattr(namespace, name) is not None and getattr(namespace, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(namespace, name)}.")


def _sources(namespace: argparse.Namespace, split_of: str) -> dict:
    """{"caption" / "interleaved": dataset} of the training split (`split_of="train"`) or the eval split."""
    from .data import load_saved_or_hub_dataset, prepare_hf_dataset, prepare_interleaved_dataset

    sources = {}
    if namespace.dataset_name:
        split = namespace.train_split if split_of == "train" else namespace.eval_split
        if split:
            dataset = prepare_hf_dataset(load_saved_or_hub_dataset(namespace.dataset_name, None, split),
                                         namespace.image_column, namespace.caption_column)
            limit = namespace.max_train_samples if split_of == "train" else None
            sources["caption"] = dataset.select(range(min(limit, len(dataset)))) if limit else dataset
    if namespace.interleaved_dataset_name:
        split = namespace.interleaved_split if split_of == "train" else namespace.interleaved_eval_split
        if split:
            dataset = prepare_interleaved_dataset(load_saved_or_hub_dataset(namespace.interleaved_dataset_name, None, split))
            limit = namespace.max_interleaved_samples if split_of == "train" else None
            sources["interleaved"] = dataset.select(range(min(limit, len(dataset)))) if limit else dataset
    return sources


def run_train_generation(namespace: argparse.Namespace) -> dict:
    from .data import GillDataCollator
    from .processing_gill import GillProcessor

    _check_arguments(namespace)
    start = time.time()
    model, form = load_for_refit(namespace.model_name_or_path, namespace.backbone_dtype)
    processor = GillProcessor.from_pretrained(namespace.processor_name_or_path or namespace.model_name_or_path)
    config = model.config
    collator = GillDataCollator(processor, max_length=namespace.max_length, num_clip_tokens=config.num_clip_tokens,
                                gen_emb_dim=config.gen_emb_dim, require_targets=True,
                                interleaved_max_length=namespace.interleaved_max_length, pooled_emb_dim=config.pooled_emb_dim)

    def states(sources: dict) -> dict[str, GenerationFeatures]:
        out = {}
        for name, dataset in sources.items():
            print(f"[train-generation] [IMG] block states of {len(dataset)} {name} rows", flush=True)
            out[name] = block_states(model, collator, dataset, namespace.feature_batch_size, progress=True)
        return out

    train_parts = states(_sources(namespace, "train"))
    evaluation = states(_sources(namespace, "eval"))
    train = GenerationFeatures.cat(list(train_parts.values()))
    features_s = time.time() - start
    print(f"[train-generation] {len(train)} rows in {features_s:.0f} s; fitting the mapper", flush=True)
    result = fit_generation_mapper(model, train, evaluation, batch_size=namespace.batch_size, steps=namespace.steps,
                                   learning_rate=namespace.learning_rate, weight_decay=namespace.weight_decay,
                                   seed=namespace.seed, logging_steps=namespace.logging_steps, progress=True)
    metrics = {"model_name_or_path": os.path.abspath(namespace.model_name_or_path),
               "num_rows": {name: len(f) for name, f in train_parts.items()}, "batch_size": namespace.batch_size,
               "steps": namespace.steps, "learning_rate": namespace.learning_rate, "losses": result.losses,
               "eval_gen_loss_before": result.eval_before, "eval_gen_loss_after": result.eval_after,
               "skipped": dict(collator.skipped), "features_s": round(features_s, 1),
               "wall_s": round(time.time() - start, 1), "form": form}
    save_refit(model, processor, form, namespace.output_dir, "generation_metrics.json", metrics)
    return metrics


def register_generation_command(subparsers) -> None:
    p = subparsers.add_parser("train-generation", help="Refit GILL's generation mapper on frozen [IMG] states "
                                                       "(after `gill-hf train`).")
    p.add_argument("--model_name_or_path", required=True, help="GILL checkpoint (full or adapter form, LoRA kept).")
    p.add_argument("--processor_name_or_path", default=None, help="GillProcessor folder (default: the checkpoint).")
    p.add_argument("--dataset_name", default=None,
                   help="Caption rows: a `datasets` dataset (name, path or saved folder) with image, caption and "
                        "gen_targets columns (`gill-hf precompute-targets`).")
    p.add_argument("--train_split", default="train")
    p.add_argument("--eval_split", default=None, help="Caption split whose generation loss is reported before and after.")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="caption")
    p.add_argument("--max_train_samples", type=int, default=None, help="Keep the first N caption rows.")
    p.add_argument("--interleaved_dataset_name", default=None,
                   help="Interleaved rows (gill_hf.interleaved schema) with gen_targets of their target captions.")
    p.add_argument("--interleaved_split", default="train")
    p.add_argument("--interleaved_eval_split", default=None, help="Interleaved split reported before and after.")
    p.add_argument("--max_interleaved_samples", type=int, default=None, help="Keep the first N interleaved rows.")
    p.add_argument("--output_dir", required=True, help="Where the model with the refit mapper is saved.")
    p.add_argument("--interleaved_max_length", type=int, default=96, help="Longest interleaved row (as in `gill-hf train`).")
    add_fit_arguments(p, batch_size=64, batch_help="Rows per step of the fit.", learning_rate=1e-4,
                      learning_rate_help="AdamW peak learning rate.", weight_decay_help="On the mapper's matrices only.",
                      feature_batch_size=32, max_length_help="Caption row length, [IMG] block included (as in `gill-hf train`).")
    p.set_defaults(func=run_train_generation)


__all__ = [
    "GENERATION_PARAMETERS",
    "GenerationFeatures",
    "GenerationFitResult",
    "block_states",
    "evaluate_generation",
    "fit_generation_mapper",
    "mapper_loss",
    "register_generation_command",
    "run_train_generation",
]
