"""Training GILL with `transformers.Trainer`.

`GillTrainer` adds to `Trainer` what GILL needs and nothing else:

- every loss component (`caption_loss`, `text_loss`, `contrastive_loss`, `gen_loss`) is logged
  beside `loss`, averaged over exactly the micro-batches that Trainer averages `loss` over;
- evaluation returns the components and the retrieval metrics (text->image / image->text R@1,
  R@5 over the whole eval set, generation L2), so `metric_for_best_model="t2i_r1"` works;
- checkpoints hold GILL's own tensors (+ LoRA weights, if any) and never a backbone tensor, and
  `resume_from_checkpoint` continues bit for bit (Trainer restores optimizer, scheduler, RNG);
- the reference's post-step renormalisation of the `[IMG]` rows, its "decay everything trainable"
  weight-decay mode and its warmup + step learning-rate schedule, each as an option.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .metrics.functional import retrieval_metrics
from .modeling.checkpointing import ADAPTER_WEIGHTS_NAME, BACKBONE_PREFIXES, gill_state_dict, load_adapter_weights
from .modeling.lora_gill import LORA_FOLDER, load_lora, save_lora
from .modeling.manifest import save_folder

logger = logging.get_logger(__name__)

LOSS_KEYS = ("caption_loss", "text_loss", "contrastive_loss", "gen_loss")  # the terms of `loss`
# Logged beside them: the pooled head's distance (decoders with a pooled vector), already inside gen_loss.
LOGGED_KEYS = (*LOSS_KEYS, "gen_pooled_loss")
TRAINING_ARGS_FILE = "training_args.bin"


@dataclass
class GillTrainingArguments(TrainingArguments):
    r"""
    `TrainingArguments` with the reference's hyper-parameters as defaults (AdamW lr 1e-3, betas
    0.9/0.95, weight decay 0.01 on every trainable tensor, gradient clipping 1.0, 2000 warmup
    steps then x0.1 every 10k steps) plus GILL's own switches.
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (reference: 1e-3)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (reference: 0.95)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (reference: 0.01)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (reference: 1.0)."})
    warmup_steps: float = field(default=2000, metadata={"help": "Linear warmup steps (reference: 2000)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep raw columns: GillDataCollator builds the model inputs itself."}
    )
    concat_captions_prob: float | None = field(
        default=None,
        metadata={"help": "Probability of the two-caption concatenation augmentation per pass (0 disables; "
                          "default: the model config's, 0.5 as in the reference)."},
    )
    contrastive_gather: str | None = field(
        default=None,
        metadata={"help": "Multi-process contrastive negatives: 'reference' (gradient through the local slice only, the "
                          "original code's) or 'autograd' (the gradient equals a single process's on the global batch); "
                          "default: the model config's ('reference').", "choices": [None, "reference", "autograd"]},
    )
    rescale_img_rows: bool = field(
        default=True, metadata={"help": "Renormalise the [IMG] rows to the LM's mean row norm after each step (reference)."}
    )
    weight_decay_mode: str = field(
        default="reference",
        metadata={"help": "'reference': decay every trainable tensor (biases, norms, logit_scale, [IMG] rows); "
                          "'standard': Trainer's grouping (no decay on biases and norms).", "choices": ["reference", "standard"]},
    )
    lr_step_size: int = field(
        default=10000,
        metadata={"help": "After warmup, multiply the LR by `lr_step_gamma` every this many steps (reference StepLR; "
                          "0 uses `lr_scheduler_type` instead)."},
    )
    lr_step_gamma: float = field(default=0.1, metadata={"help": "Factor of the step schedule (reference: 0.1)."})

    def __post_init__(self):
        super().__post_init__()
        if self.weight_decay_mode not in ("reference", "standard"):
            raise ValueError(f"`weight_decay_mode` must be 'reference' or 'standard', got {self.weight_decay_mode!r}.")
        if self.concat_captions_prob is not None and not 0.0 <= self.concat_captions_prob <= 1.0:
            raise ValueError(f"`concat_captions_prob` must lie in [0, 1], got {self.concat_captions_prob!r}.")
        if self.lr_step_size < 0:
            raise ValueError(f"`lr_step_size` must be >= 0, got {self.lr_step_size!r}.")


class RescaleImgRowsCallback(TrainerCallback):
    """The reference renormalises the `[IMG]` rows after every optimizer step (their norm would
    otherwise drift away from the frozen vocabulary's)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _unwrap(model).rescale_img_rows_()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP and friends
        model = model.module
    return model


def trainable_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(GILL's own tensors, trainable tensors inside the backbones such as LoRA weights)."""
    gill = gill_state_dict(model)
    backbone = {
        name: param.detach().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad and name.startswith(BACKBONE_PREFIXES)
    }
    return gill, backbone


def save_trainable_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Writes `gill_adapter.safetensors` (the adapter checkpoint's tensors) and, when the LM holds
    LoRA layers, `lora/` in peft's format. No frozen backbone tensor."""
    gill, backbone = trainable_state_dict(model)
    save_file(gill, os.path.join(folder, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    if backbone:
        if set(backbone) != {n for n in backbone if ".lora_" in n}:
            raise ValueError(f"Trainable backbone tensors other than LoRA cannot be saved in a GILL checkpoint: "
                             f"{sorted(n for n in backbone if '.lora_' not in n)[:4]}.")
        save_lora(model, folder)


def load_trainable_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Inverse of `save_trainable_weights`; strict (a missing or unexpected key is a `ValueError`)."""
    load_adapter_weights(model, os.path.join(folder, ADAPTER_WEIGHTS_NAME))
    _, expected = trainable_state_dict(model)
    if expected and not load_lora(model, folder):
        raise ValueError(f"{str(folder)!r} has no {LORA_FOLDER}/ for the model's LoRA weights.")


def reference_lr_lambda(warmup_steps: int, step_size: int, gamma: float):
    """Linear warmup to the peak (GradualWarmupScheduler, multiplier 1), then StepLR counted from
    the end of warmup, as the reference's scheduler pair."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return step / warmup_steps
        return gamma ** ((step - warmup_steps) // step_size)

    return factor


class GillTrainer(Trainer):
    r"""
    `Trainer` for [`GillForConditionalGeneration`]. Use with [`GillTrainingArguments`] (plain
    `TrainingArguments` work too; GILL's switches then take their defaults) and
    [`GillDataCollator`].

    The model's loss is a per-batch mean, so Trainer must divide it by the accumulation steps
    and never pass `num_items_in_batch`: `accepts_loss_kwargs = False`.
    """

    accepts_loss_kwargs = False

    def __init__(self, *args, **kwargs):
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = compute_gill_metrics
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        from .data import GillDataCollator

        if isinstance(self.data_collator, GillDataCollator) and self.args.remove_unused_columns:
            # Trainer would drop the raw caption/image columns the collator reads.
            logger.warning("GillTrainer: setting `remove_unused_columns=False` (GillDataCollator reads raw columns).")
            self.args.remove_unused_columns = False
        self.stream_position: dict | None = None  # a streamed dataset's state after the last trained batch
        self.stream_resumed = False
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_counts: dict[str, int] = {}
        if self._gill_arg("rescale_img_rows", True):
            self.add_callback(RescaleImgRowsCallback())
        gather = self._gill_arg("contrastive_gather", None)
        if gather is not None and self.model is not None:
            _unwrap(self.model).config.contrastive_gather = gather  # saved with the checkpoints' config

    def _gill_arg(self, name: str, default):
        return getattr(self.args, name, default)

    # ----- loss and logging ----------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        position = inputs.pop("stream_state", None)  # not a model input: where the stream stands after this batch
        if model.training and position is not None:
            self.stream_position = position
        if model.training:
            prob = self._gill_arg("concat_captions_prob", None)
            if prob is None:
                prob = _unwrap(model).config.concat_captions_prob
            # bool False when 0 so the model takes no RNG draw at all (reproducible with prob 0).
            concat = float(prob) if prob > 0 else False
            if concat and inputs["input_ids"].shape[0] % 2:
                concat = False  # pairs need an even batch (e.g. after the collator skipped an example)
        else:
            concat = False  # evaluation is deterministic, as the reference's validation
        outputs = model(**inputs, concat_captions=concat)
        if model.training:
            if not torch.isfinite(outputs.loss.detach()).all():
                # One NaN would turn every GILL weight into NaN and the run would "succeed" with loss 0.
                components = {k: float(outputs[k].detach()) for k in LOSS_KEYS if outputs.get(k) is not None}
                raise FloatingPointError(
                    f"Non-finite training loss at step {self.state.global_step} (components {components}); stopping "
                    "before the weights are updated. Check the data (targets, images) and the learning rate."
                )
            for key in LOGGED_KEYS:
                value = outputs.get(key)
                if value is not None:
                    value = value.detach().float()
                    self._component_sums[key] = self._component_sums.get(key, 0.0) + value
                    self._component_counts[key] = self._component_counts.get(key, 0) + 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A training log (it has "loss" and no "eval_*" key) closes the window over which Trainer
        # averaged `loss`; the components are averaged over the same micro-batches.
        if "loss" in logs and self._component_sums:
            for key, total in self._component_sums.items():
                mean = total / self._component_counts[key]
                logs[key] = self.accelerator.reduce(mean.reshape(1), reduction="mean").item()
            self._component_sums, self._component_counts = {}, {}
        skipped = getattr(self.data_collator, "num_skipped", None)
        if "loss" in logs and skipped:
            logs["skipped_examples"] = skipped
        super().log(logs, start_time)

    # ----- evaluation ----------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Returns (loss, per-example tensors for `compute_gill_metrics`, example indices)."""
        inputs = {k: v.to(self.args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        batch = inputs["input_ids"].shape[0]
        nan = torch.full((batch,), float("nan"), device=loss.device)
        # Scalars are broadcast per example so that Trainer can concatenate (and gather) them.
        columns = [outputs.get(k).detach().float().expand(batch) if outputs.get(k) is not None else nan for k in LOGGED_KEYS]
        if outputs.get("text_embeds") is not None and outputs.get("image_embeds") is not None:
            columns += [outputs.text_embeds.detach().float(), outputs.image_embeds.detach().float()]
        else:
            columns += [nan[:, None], nan[:, None]]
        if outputs.get("prompt_embeds") is not None and inputs.get("gen_targets") is not None:
            distance = (outputs.prompt_embeds.float() - inputs["gen_targets"].float()).pow(2).sum(-1).sqrt()
            columns.append(distance.mean(-1))
        else:
            columns.append(nan)
        return loss, tuple(columns), torch.arange(batch, device=loss.device)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        if self.stream_resumed:  # the stream already starts after the consumed batches
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    # ----- optimizer and schedule ----------------------------------------------------------------

    def get_decay_parameter_names(self, model) -> list[str]:
        if self._gill_arg("weight_decay_mode", "standard") == "reference":
            return [name for name, param in model.named_parameters() if param.requires_grad]
        return super().get_decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        step_size = self._gill_arg("lr_step_size", 0)
        if step_size and self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, reference_lr_lambda(warmup, step_size, self._gill_arg("lr_step_gamma", 0.1))
            )
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # ----- checkpoints ---------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """GILL's tensors + config (+ LoRA tensors) + processor + arguments; no backbone tensor."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        with save_folder(output_dir) as staging:  # the model's files as one version (the manifest primitive)
            model.config.save_pretrained(staging)
            save_trainable_weights(model, staging)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS_NAME)):
            raise ValueError(f"{resume_from_checkpoint!r} is not a GillTrainer checkpoint (no {ADAPTER_WEIGHTS_NAME}).")
        load_trainable_weights(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        load_trainable_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


def compute_gill_metrics(eval_prediction) -> dict[str, float]:
    """Eval metrics from `GillTrainer.prediction_step`'s columns: mean loss components, R@1/R@5
    both ways over the whole eval set, and the generation L2 (per-token distance, mean)."""
    columns = eval_prediction.predictions
    metrics: dict[str, float] = {}
    n = len(LOGGED_KEYS)
    for key, column in zip(LOGGED_KEYS, columns[:n]):
        values = torch.as_tensor(column, dtype=torch.float32)
        if not torch.isnan(values).all():
            metrics[key] = values.mean().item()
    text_embeds = torch.as_tensor(columns[n], dtype=torch.float32)
    image_embeds = torch.as_tensor(columns[n + 1], dtype=torch.float32)
    if not torch.isnan(text_embeds).any():
        metrics.update(retrieval_metrics(text_embeds, image_embeds))
    gen_l2 = torch.as_tensor(columns[n + 2], dtype=torch.float32)
    if not torch.isnan(gen_l2).all():
        metrics["gen_l2"] = gen_l2.mean().item()
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


__all__ = [
    "GillTrainer",
    "GillTrainingArguments",
    "LOGGED_KEYS",
    "LOSS_KEYS",
    "RescaleImgRowsCallback",
    "compute_gill_metrics",
    "load_trainable_weights",
    "reference_lr_lambda",
    "save_trainable_weights",
    "trainable_state_dict",
]
