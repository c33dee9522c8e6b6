"""Training GILL's retrieve-or-generate decision head, as the reference's notebook does:
labelled prompts -> `[IMG0]` hidden state of `prompt [IMG0..7]` (+ the best retrieval score scaled
by `exp(logit_scale)` for the `"hidden_and_score"` head) -> `Dropout(0.5) + Linear(., 2)` trained
full-batch with AdamW (lr 1e-3, no weight decay, 2000 steps, seeded) -> macro-F1 on held-out
prompts -> the head saved into the model (`config.decision_head_type` + weights). One default
differs: features are standardised for training and the scaling folded into the saved Linear
(`train_decision_head(standardize=...)`, `--feature_scaling none` for the reference).

Labels follow the reference's column order: 0 = generate, 1 = retrieve.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .metrics.functional import macro_f1
from .modeling.configuration_gill import DECISION_HEAD_TYPES
from .modeling import GillDecisionHead

logger = logging.get_logger(__name__)

LABELS = {"generate": 0, "gen": 0, "retrieve": 1, "ret": 1}
SKIPPED_LABELS = ("same",)  # the reference drops prompts where either choice is as good


def load_labelled_prompts(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """A TSV/CSV with a header naming a text column (`text`, `prompt` or `caption`) and a label
    column (`decision` or `label`: "generate"/"gen" or "retrieve"/"ret"; "same" rows are skipped),
    or JSON lines with those keys."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".jsonl", ".json")):
            rows = []
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{path!r} line {number} is not valid JSON: {error}") from error
                if not isinstance(row, dict):
                    raise ValueError(f"{path!r} line {number} must be a JSON object, got {type(row).__name__}.")
                rows.append(row)
        elif path.endswith(".csv"):
            rows = list(csv.DictReader(handle))
        else:
            # Tab-separated, quotes taken literally: an unbalanced quote must not merge rows.
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    texts, labels = [], []
    for index, row in enumerate(rows):
        text = next((row[k] for k in ("text", "prompt", "caption") if k in row), None)
        label = next((row[k] for k in ("decision", "label") if k in row), None)
        if not isinstance(text, str) or label is None or None in row:
            raise ValueError(f"{path!r} row {index}: expected a text column (text/prompt/caption) and a decision column"
                             f"{' (the row has extra fields)' if None in row else ''}.")
        label = str(label).strip().lower()
        if label in SKIPPED_LABELS:
            continue
        if label not in LABELS:
            raise ValueError(f"{path!r} row {index}: decision must be one of {sorted(LABELS)} or 'same', got {label!r}.")
        texts.append(text)
        labels.append(LABELS[label])
    if not texts:
        raise ValueError(f"{path!r} holds no labelled prompts.")
    return texts, labels


@torch.no_grad()
def decision_features(model, processor, prompts: list[str], head_type: str = "hidden",
                      retrieval_embeddings: torch.Tensor | None = None, batch_size: int = 32) -> torch.Tensor:
    """`(n, hidden)` `[IMG0]` states of `prompt [IMG0..7]` (the text pass, no image), with the best
    retrieval score `exp(logit_scale) * cos` over `retrieval_embeddings` appended for
    `"hidden_and_score"`."""
    if head_type not in DECISION_HEAD_TYPES:
        raise ValueError(f"`head_type` must be one of {DECISION_HEAD_TYPES}, got {head_type!r}.")
    if head_type == "hidden_and_score" and retrieval_embeddings is None:
        raise ValueError("The 'hidden_and_score' head needs `retrieval_embeddings` (the retrieval index's image embeddings).")
    model.eval()
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        # Long enough that no prompt is cut: the [IMG] block follows the whole prompt, as in the notebook.
        length = max(len(processor.encode_text(p)) for p in batch) + processor.num_img_tokens
        rows = processor.build_training_inputs(batch, max_length=length)
        device = model.img_embeddings.device
        states = model(input_ids=rows["input_ids"].to(device)).img_hidden_states
        features = states[:, 0].float()
        if head_type == "hidden_and_score":
            text = model.get_text_retrieval_embeds(states).float()
            index = F.normalize(retrieval_embeddings.to(device).float(), dim=-1)
            scores = model.logit_scale.exp().float() * (text @ index.T)
            features = torch.cat([features, scores.max(dim=-1).values[:, None]], dim=-1)
        chunks.append(features.cpu())
    return torch.cat(chunks)


@dataclass
class DecisionResult:
    head: GillDecisionHead
    train_f1: float
    eval_f1: float | None
    final_loss: float


def train_decision_head(features: torch.Tensor, labels: torch.Tensor | list[int], config, *, num_train: int | None = None,
                        eval_fraction: float = 0.2, steps: int = 2000, lr: float = 1e-3, seed: int = 1337,
                        standardize: bool = True) -> DecisionResult:
    """Full-batch AdamW on the first `num_train` examples (default: all but `eval_fraction`), macro-F1
    on the rest. `config` is the GILL config (its `decision_head_type` and `decision_dropout`).

    `standardize` trains on features scaled to zero mean and unit variance over the training
    examples, then folds that affine map into the Linear, so the returned head reads raw features
    and keeps the reference's format (Dropout + Linear; exact in eval mode). Why: the retrieval
    score of the `"hidden_and_score"` head is `exp(logit_scale) * cos`, tens of units with the
    classes a few units apart, beside `[IMG0]` states of unit scale; in raw units, 2000 steps at lr
    1e-3 cannot move the bias far enough to use it (GILL-tiny: held-out accuracy 0.63 raw vs 0.76
    standardised, the score alone separating the classes with AUC 0.87). `False` is the reference."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or features.shape[0] < 2:
        raise ValueError(f"`features` must be (n >= 2, dim) with one label each, got {tuple(features.shape)} and {tuple(labels.shape)}.")
    if steps <= 0:
        raise ValueError(f"`steps` must be positive, got {steps}.")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"`eval_fraction` must lie in [0, 1), got {eval_fraction}.")
    n = features.shape[0]
    num_train = num_train if num_train is not None else max(1, round(n * (1 - eval_fraction)))
    if not 0 < num_train <= n:
        raise ValueError(f"`num_train` must lie in [1, {n}], got {num_train}.")
    train_x, train_y = features[:num_train].float(), labels[:num_train]
    test_x, test_y = features[num_train:].float(), labels[num_train:]
    mean, std = torch.zeros(train_x.shape[1]), torch.ones(train_x.shape[1])
    if standardize:
        mean, spread = train_x.mean(0), train_x.std(0, correction=0)
        std = torch.where(spread > 1e-6, spread, torch.ones_like(spread))  # constant features stay as they are
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout, without disturbing the caller's RNG
        torch.manual_seed(seed)
        head = GillDecisionHead(config)
        if head.linear.in_features != features.shape[1]:
            raise ValueError(f"The {config.decision_head_type!r} head takes {head.linear.in_features} features, got {features.shape[1]}.")
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0, eps=1e-8)
        head.train()
        scaled_x = (train_x - mean) / std
        for _ in range(steps):
            loss = F.cross_entropy(head(scaled_x), train_y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():  # W (x - mean) / std + b = (W / std) x + (b - (W / std) mean)
        head.linear.weight.div_(std)
        head.linear.bias.sub_(head.linear.weight @ mean)
        train_f1 = macro_f1(head(train_x).argmax(-1), train_y)
        eval_f1 = macro_f1(head(test_x).argmax(-1), test_y) if len(test_y) else None
    return DecisionResult(head=head.requires_grad_(False), train_f1=train_f1, eval_f1=eval_f1, final_loss=loss.item())


def attach_decision_head(model, head: GillDecisionHead, head_type: str) -> None:
    """Installs a trained head in `model` (config + module); it stays frozen under GILL training."""
    model.config.decision_head_type = head_type
    model.decision_head = head.to(model.img_embeddings.device)
    model.decision_head.requires_grad_(False)


def run_train_decision(namespace: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    from .modeling import GillForConditionalGeneration
    from .processing_gill import GillProcessor

    from .modeling.checkpoint_forms import default_form
    model = GillForConditionalGeneration.from_pretrained(namespace.model_name_or_path)
    processor = GillProcessor.from_pretrained(namespace.processor_name_or_path or namespace.model_name_or_path)
    texts, labels = load_labelled_prompts(namespace.prompts)
    retrieval = None
    if namespace.retrieval_embeddings and os.path.isdir(namespace.retrieval_embeddings):
        from .retrieval import GillRetrievalIndex

        retrieval = GillRetrievalIndex.from_pretrained(namespace.retrieval_embeddings).embeddings
    elif namespace.retrieval_embeddings:
        retrieval = next(iter(load_file(namespace.retrieval_embeddings).values()))
    features = decision_features(model, processor, texts, namespace.head_type, retrieval)
    config = model.config
    config.decision_head_type = namespace.head_type
    result = train_decision_head(features, labels, config, num_train=namespace.num_train, eval_fraction=namespace.eval_fraction,
                                 steps=namespace.steps, lr=namespace.learning_rate, seed=namespace.seed,
                                 standardize=namespace.feature_scaling == "standard")
    attach_decision_head(model, result.head, namespace.head_type)
    form = default_form(config)
    model.save_pretrained(namespace.output_dir, form=form)
    processor.save_pretrained(namespace.output_dir)
    metrics = {"head_type": namespace.head_type, "num_examples": len(texts), "train_macro_f1": result.train_f1,
               "eval_macro_f1": result.eval_f1, "final_loss": result.final_loss, "steps": namespace.steps,
               "feature_scaling": namespace.feature_scaling, "form": form}
    with open(os.path.join(namespace.output_dir, "decision_metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    print(json.dumps(metrics))
    return metrics


def register_decision_command(subparsers) -> None:
    p = subparsers.add_parser("train-decision", help="Train the retrieve-or-generate head on labelled prompts and save it into the model.")
    p.add_argument("--model_name_or_path", required=True, help="GILL checkpoint (full or adapter form).")
    p.add_argument("--processor_name_or_path", default=None, help="GillProcessor folder (default: the checkpoint).")
    p.add_argument("--prompts", required=True, help="TSV/CSV/JSONL of prompts with a generate|retrieve decision.")
    p.add_argument("--output_dir", required=True, help="Where the model with its decision head is saved.")
    p.add_argument("--head_type", default="hidden", choices=DECISION_HEAD_TYPES,
                   help="'hidden' (Linear(hidden, 2)) or 'hidden_and_score' (Linear(hidden + 1, 2), needs --retrieval_embeddings).")
    p.add_argument("--retrieval_embeddings", default=None,
                   help="A GillRetrievalIndex folder, or a safetensors file holding the index's image embeddings (n, ret_emb_dim).")
    p.add_argument("--num_train", type=int, default=None, help="First N prompts train (reference: 600), the rest evaluate.")
    p.add_argument("--eval_fraction", type=float, default=0.2, help="Held-out share when --num_train is not given.")
    p.add_argument("--steps", type=int, default=2000, help="Full-batch AdamW steps (reference: 2000).")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate (reference: 1e-3).")
    p.add_argument("--seed", type=int, default=1337, help="Seed of the head's init and dropout (reference: 1337).")
    p.add_argument("--feature_scaling", default="standard", choices=["standard", "none"],
                   help="'standard': train on standardised features, folded into the saved Linear; 'none': raw (the reference).")
    p.set_defaults(func=run_train_decision)


__all__ = [
    "DecisionResult",
    "attach_decision_head",
    "decision_features",
    "load_labelled_prompts",
    "register_decision_command",
    "run_train_decision",
    "train_decision_head",
]
