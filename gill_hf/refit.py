"""What GILL's refits on frozen features share (`gill-hf train-retrieval`, `gill-hf train-generation`):
loading the checkpoint to refit and the optimisation loop over a fixed set of rows."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


def load_for_refit(path: str, backbone_dtype: str):
    """(model in eval mode, checkpoint form). `bfloat16` applies to the frozen backbones only (GILL's
    heads load in fp32), as `gill-hf train --backbone_dtype` loads them, and only for adapter-form
    checkpoints: a full-form save would write the backbones back in that dtype."""
    from .modeling import GillConfig, GillForConditionalGeneration
    from .modeling.checkpoint_forms import default_form

    form = default_form(GillConfig.from_pretrained(path))
    if backbone_dtype != "float32" and form == "full":
        raise ValueError(f"`--backbone_dtype {backbone_dtype}` needs an adapter-form checkpoint; {path!r} is full form "
                         "and would be saved with its backbones in that dtype. Use float32.")
    return GillForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, backbone_dtype)).eval(), form


def add_fit_arguments(parser, *, batch_size: int, batch_help: str, learning_rate: float, learning_rate_help: str,
                      weight_decay_help: str, feature_batch_size: int, max_length_help: str) -> None:
    """The arguments every refit command shares (its own defaults and help where they differ)."""
    parser.add_argument("--batch_size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--learning_rate", type=float, default=learning_rate, help=learning_rate_help)
    parser.add_argument("--weight_decay", type=float, default=0.01, help=weight_decay_help)
    parser.add_argument("--max_length", type=int, default=32, help=max_length_help)
    parser.add_argument("--feature_batch_size", type=int, default=feature_batch_size,
                        help="Rows per forward pass of the frozen-feature computation.")
    parser.add_argument("--backbone_dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the frozen backbones for the feature pass (bfloat16: adapter-form checkpoints only).")
    parser.add_argument("--logging_steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)


def save_refit(model, processor, form: str, output_dir: str, metrics_file: str, metrics: dict) -> None:
    """The refit model (in its checkpoint's form, LoRA included) and processor, and `metrics` as
    `metrics_file` beside them; prints the metrics without the loss log."""
    model.save_pretrained(output_dir, form=form)
    processor.save_pretrained(output_dir)
    with open(os.path.join(output_dir, metrics_file), "w") as handle:
        json.dump(metrics, handle, indent=1)
    print(json.dumps({k: v for k, v in metrics.items() if k != "losses"}))


def check_fit_arguments(num_rows: int, batch_size, steps, logging_steps, rows_name: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 2 <= batch_size <= num_rows:
        raise ValueError(f"`batch_size` must be an int in [2, {num_rows}] (the number of {rows_name}), got {batch_size!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    if isinstance(logging_steps, bool) or not isinstance(logging_steps, int) or logging_steps < 1:
        raise ValueError(f"`logging_steps` must be a positive int, got {logging_steps!r}.")


def fit_parameters(model: torch.nn.Module, params: list[torch.nn.Parameter], num_rows: int,
                   batch_loss: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int, steps: int,
                   learning_rate: float, weight_decay: float, warmup_ratio: float, max_grad_norm: float, seed: int,
                   logging_steps: int, desc: str, loss_name: str, progress: bool = False) -> list[tuple[int, float]]:
    """Trains `params` (and nothing else of `model`) on `batch_loss(row_index)` for `steps` batches of
    `batch_size` rows drawn without replacement (a fresh seeded permutation per epoch), with the
    reference's AdamW (betas 0.9/0.95, eps 1e-8, clipping `max_grad_norm`), weight decay on matrices
    only, linear warm-up over `warmup_ratio` of the steps and cosine decay. `requires_grad` flags are
    restored whatever happens. Returns the logged `(step, loss)` (step 1, every `logging_steps`, last)."""
    trainable = [p.requires_grad for p in model.parameters()]
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    losses = []
    try:
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim == 2], "weight_decay": weight_decay},
                                       {"params": [p for p in params if p.ndim != 2], "weight_decay": 0.0}],
                                      lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
        generator = torch.Generator().manual_seed(seed)
        order, cursor = torch.randperm(num_rows, generator=generator), 0
        for step in range(1, steps + 1):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(num_rows, generator=generator), 0
            loss = batch_loss(order[cursor : cursor + batch_size])
            cursor += batch_size
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            bar.update()
            if step == 1 or step % logging_steps == 0 or step == steps:
                losses.append((step, loss.item()))
                bar.set_postfix({loss_name: f"{loss.item():.4f}"})
    finally:
        bar.close()
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
    return losses


__all__ = ["add_fit_arguments", "check_fit_arguments", "fit_parameters", "load_for_refit", "save_refit"]
