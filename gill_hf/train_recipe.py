"""The `gill-hf train` recipe: GILL's model and data arguments beside every `TrainingArguments` flag
(`HfArgumentParser`), the data sources (CC3M-layout TSV, `datasets`, webdataset shards, interleaved
examples mixed in), `GillTrainer`, and the push of the result."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from .modeling.lora_gill import apply_lora, has_lora
from .training import LOGGED_KEYS, GillTrainer, GillTrainingArguments

logger = logging.get_logger(__name__)


@dataclass
class GillModelArguments:
    """What to train: an existing GILL checkpoint, or fresh GILL heads on two pretrained backbones."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "A GILL checkpoint (full or adapter form)."})
    text_model: str | None = field(default=None, metadata={"help": "Causal LM (hub id or path) for fresh GILL heads."})
    vision_model: str | None = field(default=None, metadata={"help": "CLIP-like vision model for fresh GILL heads."})
    processor_name_or_path: str | None = field(default=None, metadata={"help": "GillProcessor folder (default: the checkpoint)."})
    gen_emb_dim: int = field(default=768, metadata={"help": "Fresh heads: width of the image decoder's text space (with "
                                                            "--decoder_model, read from the decoder)."})
    ret_emb_dim: int = field(default=256, metadata={"help": "Fresh heads: retrieval embedding width."})
    num_clip_tokens: int = field(default=77, metadata={"help": "Fresh heads: length of the decoder's text conditioning (with "
                                                               "--decoder_model, read from the decoder)."})
    decoder_model: str | None = field(default=None, metadata={"help": "Fresh heads: the image decoder (folder/hub id: SD 1.x/2.x, "
                                                                      "SDXL, SD3) whose conditioning spec the mapper's heads take."})
    backbone_dtype: str = field(default="float32", metadata={"help": "dtype of the frozen backbones (float32, bfloat16)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LM (0: no LoRA, the reference)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "Comma-separated LM module names for LoRA."})


@dataclass
class GillDataArguments:
    """Where the image-caption pairs come from: the reference's CC3M layout or a `datasets` dataset."""

    train_tsv: str | None = field(default=None, metadata={"help": "CC3M layout: TSV with a `caption\\timage` header."})
    image_dir: str | None = field(default=None, metadata={"help": "CC3M layout: folder of the TSV's images (and clip_embs/)."})
    eval_tsv: str | None = field(default=None, metadata={"help": "CC3M layout: validation TSV."})
    eval_image_dir: str | None = field(default=None, metadata={"help": "Validation images (default: image_dir)."})
    targets_dir: str | None = field(default=None, metadata={"help": "Folder of <image>.npy targets (default: <image_dir>/clip_embs if "
                                                                    "present); with --webdataset, its target shards."})
    webdataset: str | None = field(default=None, metadata={
        "help": "Webdataset shards as img2dataset writes them ({key}.jpg/.txt): a folder, glob or comma-separated paths, "
                "streamed (needs --max_steps); each process reads its own shards."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset (name, path, or a folder saved by "
                                                                      "`gill-hf precompute-targets`) with image + caption columns."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default=None, metadata={"help": "Validation split."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    caption_column: str = field(default="caption", metadata={"help": "Caption column."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (needs --max_steps)."})
    max_length: int = field(default=32, metadata={"help": "Training row length, [IMG] block included (reference: 32)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})
    sd_model: str | None = field(default=None, metadata={"help": "Image decoder (folder/hub id: SD 1.x/2.x, SDXL, SD3) whose text "
                                                                 "encoders make missing targets; for fresh heads, also their decoder spec."})
    target_batch_size: int = field(default=128, metadata={"help": "Batch size of the target precompute."})
    cache_image_features: bool = field(default=False, metadata={"help": "Precompute the frozen vision features once (map-style caption data)."})
    allow_missing_targets: bool = field(default=False, metadata={
        "help": "Train without generation targets (no gen_loss: the image head does not learn). Without this flag, "
                "data with no targets and no --sd_model is an error."})
    interleaved_dataset_name: str | None = field(default=None, metadata={
        "help": "Interleaved examples (gill_hf.interleaved schema: segments, target_caption, target_image), e.g. a folder "
                "saved by `gill-hf precompute-targets`, mixed with the caption rows at --interleaved_ratio."})
    interleaved_split: str = field(default="train", metadata={"help": "Split of --interleaved_dataset_name."})
    interleaved_ratio: float = field(default=0.5, metadata={
        "help": "Share of each epoch's rows that are interleaved: every caption row once, plus interleaved rows (cycled) "
                "to make up this share."})
    interleaved_max_length: int = field(default=96, metadata={"help": "Longest interleaved row, [IMG] block included "
                                                                        "(the earliest context goes first)."})
    max_interleaved_samples: int | None = field(default=None, metadata={"help": "Keep the first N interleaved examples."})
    interleaved_group_column: str | None = field(default=None, metadata={
        "help": "Column of --interleaved_dataset_name whose values group its rows (e.g. a kind) for "
                "--interleaved_group_weights."})
    interleaved_group_weights: str | None = field(default=None, metadata={
        "help": "`group=weight,...`: a row of a group is drawn `weight` times as often as a row of weight 1 (groups not "
                "named weigh 1, 0 leaves a group out); the interleaved share stays --interleaved_ratio."})


def _load_model_and_processor(model_args: GillModelArguments):
    from transformers import AutoImageProcessor, AutoTokenizer

    from .modeling import GillForConditionalGeneration
    from .processing_gill import GillProcessor

    dtype = getattr(torch, model_args.backbone_dtype)
    if model_args.model_name_or_path:
        model = GillForConditionalGeneration.from_pretrained(model_args.model_name_or_path, dtype=dtype)
        processor = GillProcessor.from_pretrained(model_args.processor_name_or_path or model_args.model_name_or_path)
    elif model_args.text_model and model_args.vision_model:
        if model_args.processor_name_or_path:
            processor = GillProcessor.from_pretrained(model_args.processor_name_or_path)
        else:
            processor = GillProcessor(image_processor=AutoImageProcessor.from_pretrained(model_args.vision_model),
                                      tokenizer=AutoTokenizer.from_pretrained(model_args.text_model))
        spec = {"gen_emb_dim": model_args.gen_emb_dim, "num_clip_tokens": model_args.num_clip_tokens}
        if model_args.decoder_model:
            from .decoders import decoder_config_kwargs

            spec = decoder_config_kwargs(model_args.decoder_model)
        model = GillForConditionalGeneration.from_pretrained_backbones(
            model_args.text_model, model_args.vision_model, tokenizer=processor.tokenizer, dtype=dtype,
            ret_emb_dim=model_args.ret_emb_dim, **spec,
        )
    else:
        raise ValueError("Pass `--model_name_or_path`, or both `--text_model` and `--vision_model`.")
    model.train()
    if model_args.lora_r > 0:
        if has_lora(model):  # peft would inject a second, freshly initialised adapter over the loaded one
            raise ValueError(f"`--lora_r`: {model_args.model_name_or_path!r} already holds LoRA layers (its `lora/`), which "
                             "train on without the flag; drop `--lora_r` to continue them.")
        apply_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                   [m.strip() for m in model_args.lora_target_modules.split(",") if m.strip()])
    return model, processor


def _load_split(data_args: GillDataArguments, tsv: str | None, image_dir: str | None, split: str | None, limit: int | None,
                training: bool = False):
    from . import data

    streaming = data_args.streaming
    if data_args.webdataset and training:
        from .shards import load_webdataset

        if tsv or data_args.dataset_name:
            raise ValueError("Pass one training source: `--webdataset`, `--train_tsv` or `--dataset_name`.")
        dataset, streaming = load_webdataset(data_args.webdataset, data_args.targets_dir), True
    elif tsv:
        if not image_dir:
            raise ValueError("`--image_dir` is required with a TSV.")
        dataset = data.load_cc3m_dataset(tsv, image_dir, data_args.targets_dir or True)
    elif data_args.dataset_name and split:
        raw = data.load_saved_or_hub_dataset(data_args.dataset_name, data_args.dataset_config_name, split, data_args.streaming)
        dataset = data.prepare_hf_dataset(raw, data_args.image_column, data_args.caption_column)
    else:
        return None
    if limit is not None:
        dataset = dataset.take(limit) if streaming else dataset.select(range(min(limit, len(dataset))))
    return dataset


def _prepare(dataset, data_args: GillDataArguments, model, processor):
    """Adds SD targets when the data lacks them and an SD model is named; caches vision features."""
    from . import data

    columns = getattr(dataset, "column_names", None) or []
    if "__url__" in columns and "gen_targets" not in columns:  # webdataset shards without --targets_dir
        if data_args.sd_model:
            raise ValueError("`--webdataset` takes its targets from shards: run `gill-hf precompute-targets --webdataset "
                             "... --output_dir T` and pass `--targets_dir T` (not `--sd_model`).")
        return dataset
    if data_args.sd_model and "gen_targets" not in columns and "gen_targets_path" not in columns:
        dataset = data.add_generation_targets(dataset, data_args.sd_model, data_args.target_batch_size)
    if data_args.cache_image_features and not data_args.streaming:
        dataset = data.cache_image_features(dataset, model, processor)
    return dataset


def _check_targets(train, data_args: GillDataArguments) -> None:
    """Data without generation targets trains no image head: an error unless asked for (loudly)."""
    columns = getattr(train, "column_names", None)
    if columns is None or "gen_targets" in columns or "gen_targets_path" in columns:
        return  # a stream of unknown columns: the collator finds out per batch
    message = ("The training data has no generation targets (`gen_targets` / the reference's clip_embs/*.npy) and no "
               "`--sd_model` to compute them: `gen_loss` would be dropped and the image head would not learn.")
    if not data_args.allow_missing_targets:
        raise ValueError(message + " Pass `--sd_model`, precompute them (`gill-hf precompute-targets`), or "
                                   "`--allow_missing_targets` to train the other losses only.")
    logger.warning(message + " Training without it (`--allow_missing_targets`).")


def _mix_interleaved(train, data_args: GillDataArguments, seed: int):
    """The caption rows and the interleaved rows in one dataset at `--interleaved_ratio`."""
    from .data import add_generation_targets, load_saved_or_hub_dataset, prepare_interleaved_dataset
    from .interleaved import MixedDataset

    if data_args.streaming or data_args.cache_image_features:
        raise ValueError("`--interleaved_dataset_name` mixes map-style rows with raw images: it cannot be combined with "
                         "`--streaming` or `--cache_image_features`.")
    interleaved = prepare_interleaved_dataset(load_saved_or_hub_dataset(data_args.interleaved_dataset_name, None,
                                                                        data_args.interleaved_split))
    if data_args.max_interleaved_samples is not None:
        interleaved = interleaved.select(range(min(data_args.max_interleaved_samples, len(interleaved))))
    if "gen_targets" not in interleaved.column_names:
        if not data_args.sd_model:
            raise ValueError(f"{data_args.interleaved_dataset_name!r} has no `gen_targets`: pass `--sd_model` (or run "
                             "`gill-hf precompute-targets` on it) so its target captions have generation targets.")
        interleaved = add_generation_targets(interleaved, data_args.sd_model, data_args.target_batch_size, "target_caption")
    return MixedDataset(train, interleaved, data_args.interleaved_ratio, _interleaved_order(interleaved, data_args, seed))


def _interleaved_order(interleaved, data_args: GillDataArguments, seed: int) -> list[int] | None:
    """The weighted order of the interleaved rows (`--interleaved_group_column` / `_weights`), or None."""
    from .interleaved import group_weighted_order, parse_group_weights

    column, spec = data_args.interleaved_group_column, data_args.interleaved_group_weights
    if (column is None) != (spec is None):
        raise ValueError("`--interleaved_group_column` and `--interleaved_group_weights` go together: pass both or neither.")
    if column is None:
        return None
    if column not in interleaved.column_names:
        raise ValueError(f"`--interleaved_group_column` {column!r} is not a column of {data_args.interleaved_dataset_name!r} "
                         f"(columns: {interleaved.column_names}).")
    order = group_weighted_order([str(g) for g in interleaved[column]], parse_group_weights(spec), seed)
    logger.info("Interleaved rows weighted by %r: %s", column, dict(Counter(interleaved[column][i] for i in order)))
    return order


def train_from_argv(argv: list[str]) -> GillTrainer:
    """`gill-hf train ARGV`: GILL's model, data and every `TrainingArguments` flag through
    `HfArgumentParser`, or one JSON/YAML file holding them all."""
    from transformers import HfArgumentParser

    argv = list(argv)
    parser = HfArgumentParser((GillModelArguments, GillDataArguments, GillTrainingArguments), prog="gill-hf train")
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        load = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        model_args, data_args, training_args = load(argv[0])  # the file says everything, precision included
    else:
        # bf16 where the hardware supports it, as the reference trains; an explicit flag wins.
        if not any(flag in argv for flag in ("--bf16", "--fp16")) and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            argv.append("--bf16")
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return train_from_arguments(model_args, data_args, training_args)


def train_from_arguments(model_args: GillModelArguments, data_args: GillDataArguments, training_args: TrainingArguments) -> GillTrainer:
    """The `gill-hf train` recipe: load, build data, train (resuming if asked), save GILL's weights,
    evaluate, and push with the package's push function when `--push_to_hub` is set."""
    from transformers import set_seed

    from .data import GillDataCollator

    set_seed(training_args.seed)  # fresh heads are initialised reproducibly
    model, processor = _load_model_and_processor(model_args)
    train = _load_split(data_args, data_args.train_tsv, data_args.image_dir, data_args.train_split, data_args.max_train_samples,
                        training=True)
    if train is None:
        raise ValueError("No training data: pass `--train_tsv` and `--image_dir`, `--dataset_name`, or `--webdataset`.")
    evaluation = _load_split(data_args, data_args.eval_tsv, data_args.eval_image_dir or data_args.image_dir,
                             data_args.eval_split, data_args.max_eval_samples)
    train = _prepare(train, data_args, model, processor)
    _check_targets(train, data_args)
    evaluation = _prepare(evaluation, data_args, model, processor) if evaluation is not None else None
    if data_args.interleaved_dataset_name:
        train = _mix_interleaved(train, data_args, training_args.seed)

    if data_args.webdataset:
        _stream_per_process(train, training_args)

    push, training_args.push_to_hub = training_args.push_to_hub, False  # our push function, not Trainer's
    collator = GillDataCollator(processor, max_length=data_args.max_length, num_clip_tokens=model.config.num_clip_tokens,
                                gen_emb_dim=model.config.gen_emb_dim, caption_column="caption", image_column="image",
                                interleaved_max_length=data_args.interleaved_max_length, pooled_emb_dim=model.config.pooled_emb_dim,
                                # streamed shards with target shards: a key without a target is skipped and counted,
                                # even when no other example of its batch has one (never a batch without gen_loss)
                                require_targets=True if data_args.webdataset and data_args.targets_dir else None)
    trainer = GillTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          data_collator=collator, processing_class=processor)
    if data_args.webdataset:
        from transformers.trainer_utils import get_last_checkpoint

        from .shards import StreamStateCallback

        resume = training_args.resume_from_checkpoint
        if resume in (True, "True", "true"):
            resume = get_last_checkpoint(training_args.output_dir)
        trainer.add_callback(StreamStateCallback(trainer, resume or None))
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if evaluation is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if push and trainer.is_world_process_zero():
        push_trained_model(trainer, processor, training_args.hub_model_id, data=_describe_data(data_args, len(train)))
    return trainer


def _stream_per_process(train, training_args: TrainingArguments) -> None:
    """Each process streams its own whole shards (accelerate's `IterableDataset.shard`), never every
    rank everything nor rank 0 everything (accelerate's default for iterable data dispatches
    batches from rank 0)."""
    from .shards import check_shards_for_processes

    if training_args.max_steps <= 0:
        raise ValueError("`--webdataset` streams: pass `--max_steps`.")
    check_shards_for_processes(train, training_args.world_size)
    training_args.accelerator_config.dispatch_batches = False  # an AcceleratorConfig after TrainingArguments' init


def _describe_data(data_args: GillDataArguments, num_examples: int | None) -> str:
    source = data_args.dataset_name or data_args.train_tsv or "unknown"
    count = f", {num_examples:,} examples" if num_examples is not None else ""
    return f"`{source}` ({'datasets' if data_args.dataset_name else 'CC3M-layout TSV'}{count})"


def push_trained_model(trainer: GillTrainer, processor=None, repo_id: str | None = None, api=None, data: str | None = None):
    """Pushes the trained model with the package's push function (`gill_hf.hub.push_to_hub`:
    adapter form whenever both backbones have references); the card and the commit message carry
    the run: its `data`, steps, last training loss components and last evaluation metrics."""
    from . import hub

    args = trainer.args
    repo_id = repo_id or os.path.basename(os.path.abspath(args.output_dir))
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    metrics = {f"train_{k}": v for k, v in (train_logs[-1] if train_logs else {}).items() if k in ("loss", *LOGGED_KEYS)}
    metrics.update({k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_") and isinstance(v, float)})
    summary = f"GillTrainer: {trainer.state.global_step} steps"
    if evals:
        summary += ", " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval_"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    return hub.push_to_hub(model, repo_id, api=api, processor=processor, commit_message=summary,
                           private=getattr(args, "hub_private_repo", None), token=getattr(args, "hub_token", None),
                           training={"data": data, "steps": trainer.state.global_step, "metrics": metrics})


__all__ = ["GillDataArguments", "GillModelArguments", "push_trained_model", "train_from_arguments", "train_from_argv"]
