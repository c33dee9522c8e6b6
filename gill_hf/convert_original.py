"""Convert a checkpoint of the original GILL code (`checkpoints/gill_opt/` of the reference
repository, `jykoh/gill` on the Hub) into this package's format.

Nothing in the original files is ever fully unpickled: the torch checkpoints go through
`torch.load(weights_only=True)` and the retrieval-embedding pickle through `safe_loading.RestrictedUnpickler`,
which admits only what such files contain. A hostile pickle is refused before anything runs.

    gill-hf convert-original ORIGINAL_DIR OUTPUT_DIR --text-model facebook/opt-6.7b \
        --vision-model openai/clip-vit-large-patch14 [--sd-model DIR] [--form adapter|full]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from .backbones import resolve_backbone
from .modeling import GillConfig, GillForConditionalGeneration, add_gill_tokens
from .safe_loading import check_torch_archive, load_retrieval_pickle

MODEL_ARGS = "model_args.json"
GILL_CHECKPOINT = "pretrained_ckpt.pth.tar"
DECISION_CHECKPOINT = "decision_model.pth.tar"
RETRIEVAL_GLOB = "cc3m*.npy"

# model_args.json field -> GillConfig field. Older releases wrote a few names differently.
_ARG_ALIASES = {
    "n_visual_tokens": "num_visual_tokens",
    "num_tokens": "num_img_tokens",
    "ret_emb_dim": "ret_emb_dim",
    "shared_emb_dim": "ret_emb_dim",
    "gen_emb_dim": "gen_emb_dim",
    "num_clip_tokens": "num_clip_tokens",
    "text_emb_layers": "text_emb_layers",
}

# Original key prefix -> this package's (the mapper's torch nn.Transformer keeps its own names).
_KEY_PREFIXES = [
    ("model.visual_embeddings.", "visual_projection."),
    ("model.visual_fc.", "image_retrieval_projection."),
    ("model.ret_text_hidden_fcs.0.model.", "text_retrieval_projection."),
    ("model.gen_text_hidden_fcs.0.fc.", "mapper.input_proj."),
    ("model.gen_text_hidden_fcs.0.tfm.", "mapper.transformer."),
    ("model.gen_text_hidden_fcs.0.model.", "mapper.output_proj."),
]
_KEY_EXACT = {
    "model.input_embeddings.weight": "img_embeddings",
    "model.logit_scale": "logit_scale",
    "model.gen_text_hidden_fcs.0.query_embs": "mapper.queries",
}


def read_model_args(original_dir: str | os.PathLike) -> dict[str, Any]:
    """GillConfig fields and backbone names from `model_args.json` (current and older names)."""
    path = Path(original_dir) / MODEL_ARGS
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: is {str(original_dir)!r} an original GILL checkpoint folder?")
    try:
        args = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
    if args.get("text_fc_mode", "gill_mapper") != "gill_mapper" or args.get("ret_text_fc_mode", "linear") != "linear":
        raise ValueError(f"{str(path)!r}: only text_fc_mode 'gill_mapper' with ret_text_fc_mode 'linear' is GILL.")
    if not args.get("share_ret_gen", True):
        raise ValueError(f"{str(path)!r}: share_ret_gen=false (separate [RET]/[GEN] tokens) is not supported.")
    fields = {ours: args[theirs] for theirs, ours in _ARG_ALIASES.items() if theirs in args}
    fields.setdefault("num_visual_tokens", 1)  # GILLArgs' default when the file does not say
    return {"gill": fields, "text_model": args.get("opt_version"), "vision_model": args.get("visual_encoder")}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True, map_location="cpu")` of an original checkpoint (the released
    files were saved on cuda:0), after `check_torch_archive` (stored members, sizes, CRCs), unwrapped
    from `{'state_dict': ...}` and DDP's `module.` prefix. Anything else is a `ValueError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist.")
    check_torch_archive(path)
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise ValueError(f"{str(path)!r} holds objects other than tensors and containers; refusing to load it: {error}") from error
    except Exception as error:  # truncated, corrupt or not a torch file: every failure names the file
        raise ValueError(f"{str(path)!r} is truncated or corrupt ({type(error).__name__}: {error})") from error
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of named tensors.")
    return {key.removeprefix("module."): value for key, value in state.items()}


def convert_gill_state_dict(original: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Renames the original GILL tensors; every expected key must arrive with its expected shape."""
    converted = {}
    for key, tensor in original.items():
        new_key = _KEY_EXACT.get(key)
        for old, new in _KEY_PREFIXES:
            if new_key is None and key.startswith(old):
                new_key = new + key[len(old):]
        if new_key is None:
            raise ValueError(f"{source}: unexpected key {key!r} (not a GILL tensor).")
        converted[new_key] = tensor
    missing = sorted(set(expected) - set(converted) - {"img_output_embeddings"} - {k for k in expected if k.startswith("decision_head.")})
    if missing:
        raise ValueError(f"{source}: missing keys for {missing}.")
    for key, tensor in converted.items():
        if key not in expected:
            raise ValueError(f"{source}: key for {key!r} has no place in the model.")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}."
            )
    return converted


def load_decision_head(path: str | os.PathLike, hidden_size: int) -> tuple[str, dict[str, torch.Tensor]]:
    """The decision head (`nn.Sequential(Dropout, Linear)`, keys `1.weight`/`1.bias`); its input
    width tells the variant: hidden (the repository's) or hidden + 1 (the paper-era head)."""
    state = load_torch_state_dict(path)
    if set(state) != {"1.weight", "1.bias"}:
        raise ValueError(f"{str(path)!r}: expected keys ['1.bias', '1.weight'], got {sorted(state)}.")
    weight, bias = state["1.weight"], state["1.bias"]
    variants = {hidden_size: "hidden", hidden_size + 1: "hidden_and_score"}
    if weight.ndim != 2 or weight.shape[0] != 2 or weight.shape[1] not in variants or tuple(bias.shape) != (2,):
        raise ValueError(
            f"{str(path)!r}: '1.weight' has shape {tuple(weight.shape)}, expected (2, {hidden_size}) or (2, {hidden_size + 1})."
        )
    return variants[weight.shape[1]], {"decision_head.linear.weight": weight, "decision_head.linear.bias": bias}


def _backbone_config(reference: Any):
    source, extra = resolve_backbone(reference)
    config = AutoConfig.from_pretrained(source, **extra)
    return getattr(config, "vision_config", config)


def convert_original(
    original_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    text_model: Any = None,
    vision_model: Any = None,
    form: str = "adapter",
    sd_model: Any = None,
    tokenizer=None,
    image_processor=None,
    text_config=None,
    vision_config=None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    r"""
    Converts an original GILL folder into a model folder (config, weights, processor, and the
    retrieval index in `retrieval_index/` when the folder has one), or, given `sd_model`, into a
    complete `GillPipeline` folder.

    Args:
        original_dir: holds `model_args.json`, `pretrained_ckpt.pth.tar`, optionally
            `decision_model.pth.tar` and `cc3m*.npy`.
        text_model / vision_model: backbone references (hub id, folder or reference dict); default
            to the names in `model_args.json`.
        form: `"adapter"` (GILL tensors + backbone references) or `"full"` (backbones included).
        sd_model: a Stable Diffusion folder or repo id; the output is then a pipeline folder
            (the backbones are loaded to assemble it).
        tokenizer / image_processor: override loading them from the backbones.
        text_config / vision_config: backbone configs, to convert without reading the backbones
            (adapter form only).
        dtype: dtype of the saved GILL tensors (the release is bf16).
    """
    original_dir, output_dir = Path(original_dir), Path(output_dir)
    if form not in ("adapter", "full"):
        raise ValueError(f"`form` must be 'adapter' or 'full', got {form!r}.")
    args = read_model_args(original_dir)
    text_model = text_model or args["text_model"]
    vision_model = vision_model or args["vision_model"]
    if text_model is None or vision_model is None:
        raise ValueError("Name the backbones (`text_model`, `vision_model`): model_args.json does not.")
    text_config = text_config or _backbone_config(text_model)
    vision_config = vision_config or _backbone_config(vision_model)
    if tokenizer is None:
        source, extra = resolve_backbone(text_model)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the reference and GillProcessor do
    num_img_tokens = args["gill"].get("num_img_tokens", 8)
    image_token_id, img_token_ids = add_gill_tokens(tokenizer, num_img_tokens)

    state = load_torch_state_dict(original_dir / GILL_CHECKPOINT)
    decision_type, decision_state = None, {}
    if (original_dir / DECISION_CHECKPOINT).is_file():
        decision_type, decision_state = load_decision_head(original_dir / DECISION_CHECKPOINT, text_config.hidden_size)
    config = GillConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), img_token_ids=img_token_ids,
        image_token_id=image_token_id, vocab_size=len(tokenizer), decision_head_type=decision_type,
        backbone_references={"text_model": text_model, "vision_model": vision_model}, **args["gill"],
    )
    if not config.lm_ties_embeddings:
        raise ValueError("The original GILL checkpoints are for LMs with tied embeddings (OPT); the text model is untied.")
    with torch.device("meta"):
        skeleton = GillForConditionalGeneration(config)
    expected = {k: v for k, v in skeleton.state_dict().items() if not k.startswith(("language_model.", "vision_model."))}
    converted = convert_gill_state_dict(state, expected, str(original_dir / GILL_CHECKPOINT))
    converted.update(decision_state)
    converted = {key: tensor.to(dtype) for key, tensor in converted.items()}

    processor = _processor(tokenizer, image_processor, vision_model, config)
    index = _retrieval_index(original_dir)
    if form == "adapter" and sd_model is None:
        skeleton.load_state_dict(converted, strict=False, assign=True)
        model = skeleton
    else:
        language_model, vision = GillForConditionalGeneration._load_backbones(text_model, vision_model)
        model = GillForConditionalGeneration(config, language_model=language_model, vision_model=vision)
        model.load_state_dict(converted, strict=False)
        if sd_model is not None:
            from .pipelines import GillPipeline

            GillPipeline.from_sd_and_gill(sd_model, model.eval(), processor, retrieval_index=index).save_pretrained(output_dir)
            return output_dir
    # Each part is its own save (the model's and the index's manifests): the model comes last, so a
    # folder that holds a model also holds its processor and index.
    if index is not None:
        index.save_pretrained(output_dir / "retrieval_index")
    processor.save_pretrained(output_dir)
    model.save_pretrained(output_dir, form=form)
    return output_dir


def _processor(tokenizer, image_processor, vision_model, config: GillConfig):
    from .processing_gill import GillProcessor

    if image_processor is None:
        source, extra = resolve_backbone(vision_model)
        image_processor = AutoImageProcessor.from_pretrained(source, **extra)
    return GillProcessor(image_processor, tokenizer, num_img_tokens=config.num_img_tokens,
                         num_visual_tokens=config.num_visual_tokens)


def _retrieval_index(original_dir: Path):
    files = sorted(glob.glob(str(original_dir / RETRIEVAL_GLOB)))
    if not files:
        return None
    from .retrieval import GillRetrievalIndex

    paths, embeddings = [], []
    for file in files:
        file_paths, file_embeddings = load_retrieval_pickle(file)
        paths += file_paths
        embeddings.append(file_embeddings)
    return GillRetrievalIndex.from_embeddings(torch.cat(embeddings), references=paths)


def register(subparsers) -> None:
    """Adds `gill-hf convert-original` to an argparse subparsers object."""
    parser = subparsers.add_parser("convert-original", help="convert an original GILL checkpoint folder")
    parser.add_argument("original_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--text-model", help="hub id or folder of the LM (default: model_args.json's opt_version)")
    parser.add_argument("--vision-model", help="hub id or folder of the vision tower (default: model_args.json's visual_encoder)")
    parser.add_argument("--sd-model", help="Stable Diffusion folder or hub id: write a complete pipeline folder")
    parser.add_argument("--form", choices=["adapter", "full"], default="adapter")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.set_defaults(func=lambda a: print(convert_original(
        a.original_dir, a.output_dir, text_model=a.text_model, vision_model=a.vision_model, form=a.form, sd_model=a.sd_model,
        dtype=getattr(torch, a.dtype))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gill-hf")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    args.func(args)


__all__ = ["convert_original", "load_torch_state_dict", "read_model_args"]
