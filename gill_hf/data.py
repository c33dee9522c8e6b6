"""GILL training data: a collator that builds the model's training inputs from raw examples, and
dataset builders for the reference's CC3M layout and for any `datasets` image + caption dataset.

Examples stay raw (a caption, an image as a path / bytes / PIL image, optionally the generation
target or a path to it) until the collator: decoding happens there so that one unreadable image
or target file costs one example, counted and logged, never a crashed run.

Precomputation, each once per dataset and stored with it through `datasets.map` (arrow cache):
- `precompute_gen_targets`: the SD text encoder's `last_hidden_state` of each caption (77 x dim);
- `cache_image_features`: the frozen vision tower's pooled features, so that an epoch does not
  recompute them (the model's `forward(image_features=...)` takes them instead of pixels).
"""

from __future__ import annotations

import copy
import csv
import io
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.utils import logging

from .images import check_image_size

logger = logging.get_logger(__name__)

CLIP_EMBS_FOLDER = "clip_embs"  # the reference's precomputed targets: <image_dir>/clip_embs/<image>.npy


def _open_image(value: Any) -> PIL.Image.Image:
    """A path, `{"bytes", "path"}` dict (a `datasets.Image(decode=False)` cell), PIL image or HWC
    uint8 array -> RGB PIL image. Any failure raises (the collator counts it)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = io.BytesIO(value["bytes"])
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("empty image cell")
    if isinstance(value, (str, os.PathLike, io.BytesIO)):
        with PIL.Image.open(value) as image:
            check_image_size(image.width, image.height, "image")  # before decoding: a bomb is never inflated
            image.load()  # decode now: truncated files fail here, not later
            rgb = image.convert("RGB")
    elif isinstance(value, PIL.Image.Image):
        rgb = value.convert("RGB")
    elif isinstance(value, np.ndarray):
        rgb = PIL.Image.fromarray(value).convert("RGB")
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__}")
    if rgb.width == 0 or rgb.height == 0:
        raise ValueError("zero-size image")
    return rgb


def _read_array(value: Any) -> Any:
    """A `.npy` path or `.npy` bytes (webdataset target shards) -> array, read without pickles; other
    values as they are."""
    if isinstance(value, (str, os.PathLike)):
        return np.load(value, allow_pickle=False)
    if isinstance(value, bytes):
        return np.load(io.BytesIO(value), allow_pickle=False)
    return value


def _load_target(value: Any, num_clip_tokens: int | None, gen_emb_dim: int | None = None) -> torch.Tensor:
    """An array-like target, or a path to a `.npy` file (read without pickles), -> float tensor,
    cut to the first `num_clip_tokens` rows as the reference does. A target of another shape, or
    holding NaN/inf (an fp16 overflow would turn every GILL weight into NaN on the first step),
    raises (the collator counts the row as skipped)."""
    target = torch.as_tensor(np.asarray(_read_array(value), dtype=np.float32))
    if target.ndim != 2:
        raise ValueError(f"a generation target must be (tokens, dim), got shape {tuple(target.shape)}")
    target = target[:num_clip_tokens] if num_clip_tokens else target
    if (num_clip_tokens and target.shape[0] != num_clip_tokens) or (gen_emb_dim and target.shape[1] != gen_emb_dim):
        raise ValueError(f"a generation target must be ({num_clip_tokens}, {gen_emb_dim}), got {tuple(target.shape)}")
    if not torch.isfinite(target).all():
        raise ValueError("the generation target holds NaN or infinite values")
    return target


def _load_pooled_target(value: Any, pooled_emb_dim: int) -> torch.Tensor:
    """A pooled target (the decoder's pooled vector of the caption) -> float tensor `(pooled_emb_dim,)`."""
    if value is None:
        raise ValueError("the example has no pooled generation target")
    target = torch.as_tensor(np.asarray(_read_array(value), dtype=np.float32))
    if target.shape != (pooled_emb_dim,):
        raise ValueError(f"a pooled generation target must be ({pooled_emb_dim},), got {tuple(target.shape)}")
    if not torch.isfinite(target).all():
        raise ValueError("the pooled generation target holds NaN or infinite values")
    return target


@dataclass
class _Row:
    """One example as the collator keeps it: a caption row or an interleaved row."""

    text: str | None = None  # a caption row's caption
    prompt: list | None = None  # an interleaved row's segments as a prompt (strings and images / features)
    image: Any = None  # the paired image (a caption's image, an interleaved example's target), or None
    feature: torch.Tensor | None = None  # its cached vision features (caption rows)
    target: torch.Tensor | None = None
    pooled_target: torch.Tensor | None = None  # decoders with a pooled vector (SDXL, SD3)


class GillDataCollator:
    r"""
    Builds the model's training inputs from raw examples of two kinds, which may share a batch:

    - a **caption** example: a caption (`caption_column`) and either cached vision features
      (`features_column`) or an image (`image_column`: a path, a `datasets.Image(decode=False)`
      cell, a PIL image or an HWC uint8 array); rows from [`GillProcessor.build_training_inputs`]
      (the reference's truncation rule: the `[IMG]` block always survives);
    - an **interleaved** example (`gill_hf.interleaved`): `segments` (text and images in order),
      `target_caption` and `target_image` (None where unknown: the row is then not `paired`); rows
      from [`GillProcessor.build_interleaved_training_inputs`] (at most `interleaved_max_length`
      tokens), flagged in `interleaved`. Cached vision features are for caption-only batches.

    Either kind may carry a generation target (`target_column`: an array, or `target_path_column`:
    a `.npy` path) and, for decoders with a pooled vector (`pooled_emb_dim` set), its pooled target
    (`pooled_target_column`, required then). Examples whose image or target cannot be read, whose target has the wrong shape
    or holds NaN/inf, or whose caption is empty, are skipped; `skipped` counts them by reason and
    every skip is logged with the running count. A batch of caption examples only gives exactly the
    inputs of caption training (no interleaved keys).

    Args:
        processor: a [`GillProcessor`].
        max_length: caption row length (reference: 32).
        num_clip_tokens: rows of each target kept (reference: the model's `num_clip_tokens`).
        gen_emb_dim: width every target must have (the model's `gen_emb_dim`).
        require_targets: skip examples without a target; `None` (default): required when any
            example of the batch has one (a batch is all-or-nothing for `gen_loss`).
        interleaved_max_length: longest interleaved row, `[IMG]` block included.
        pooled_emb_dim: the model's `pooled_emb_dim` (None: no pooled targets are read).
    """

    def __init__(
        self,
        processor,
        max_length: int = 32,
        num_clip_tokens: int | None = None,
        caption_column: str = "caption",
        image_column: str = "image",
        features_column: str = "image_features",
        target_column: str = "gen_targets",
        target_path_column: str = "gen_targets_path",
        require_targets: bool | None = None,
        gen_emb_dim: int | None = None,
        interleaved_max_length: int = 96,
        pooled_target_column: str = "gen_pooled_targets",
        pooled_emb_dim: int | None = None,
    ):
        self.processor = processor
        self.pooled_target_column, self.pooled_emb_dim = pooled_target_column, pooled_emb_dim
        self.max_length = max_length
        self.num_clip_tokens = num_clip_tokens
        self.gen_emb_dim = gen_emb_dim
        self.caption_column = caption_column
        self.image_column = image_column
        self.features_column = features_column
        self.target_column = target_column
        self.target_path_column = target_path_column
        self.require_targets = require_targets
        self.interleaved_max_length = interleaved_max_length
        self.skipped: Counter[str] = Counter()
        # A streamed training dataset whose `state_dict()` each batch carries (`shards.StreamStateCallback`).
        self.stream = None

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def _skip(self, reason: str, example: dict, error: Exception | None = None) -> None:
        self.skipped[reason] += 1
        where = example.get(self.image_column) if isinstance(example.get(self.image_column), str) else ""
        logger.warning(f"Skipping an example ({reason}{': ' + where if where else ''}{': ' + str(error) if error else ''}); "
                       f"skipped so far: {dict(self.skipped)}.")

    def _target_value(self, example: dict):
        value = example.get(self.target_column)
        return value if value is not None else example.get(self.target_path_column)

    def _row(self, example: dict, require: bool, expected_dim: int | None) -> _Row | None:
        """The example as a `_Row`, or None when it was skipped (counted)."""
        if example.get("skip_reason"):  # a stream's marker for data it could not read (e.g. a bad shard)
            self._skip(example["skip_reason"], example)
            return None
        interleaved = "segments" in example
        row = _Row()
        text = example.get("target_caption" if interleaved else self.caption_column)
        if not isinstance(text, str) or not text.strip():
            self._skip("bad_caption", example)
            return None
        if require:
            value = self._target_value(example)
            if value is None:
                self._skip("missing_target", example)
                return None
            try:
                row.target = _load_target(value, self.num_clip_tokens, self.gen_emb_dim or expected_dim)
                if self.pooled_emb_dim is not None:
                    row.pooled_target = _load_pooled_target(example.get(self.pooled_target_column), self.pooled_emb_dim)
            except Exception as error:  # unreadable / truncated / pickled / mis-shaped / non-finite: one example lost
                self._skip("bad_target", example, error)
                return None
        cached = example.get(self.features_column)
        try:
            if interleaved:
                from .interleaved import segments_to_prompt

                target = example.get("target_image")
                row.image = _open_image(target) if target is not None else None
                row.prompt = segments_to_prompt(example["segments"], _open_image)
            elif cached is not None:
                row.feature, row.text = torch.as_tensor(np.asarray(cached, dtype=np.float32)), text
            else:
                row.image, row.text = _open_image(example.get(self.image_column)), text
        except Exception as error:
            self._skip("bad_image", example, error)
            return None
        return row

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        require = self.require_targets
        if require is None:
            require = any(self._target_value(e) is not None for e in examples)
        rows: list[_Row] = []
        for example in examples:
            row = self._row(example, require, rows[0].target.shape[1] if rows and rows[0].target is not None else None)
            if row is not None:
                rows.append(row)
        if not rows:
            raise ValueError(f"Every example of this batch was skipped ({dict(self.skipped)} so far); check the data.")
        captions = [r for r in rows if r.prompt is None]
        interleaved = [r for r in rows if r.prompt is not None]
        cached = [r.feature is not None for r in captions]
        if any(cached) and (not all(cached) or interleaved):
            raise ValueError(f"A batch mixes cached `{self.features_column}` with raw images (interleaved rows always "
                             "carry raw images); cache the features of caption-only data.")
        # caption training exactly as the reference builds it when there is no interleaved row
        batch = self._mixed_batch(captions, interleaved, require) if interleaved else self._caption_batch(captions, require)
        if self.stream is not None:  # the stream's position after this batch's examples
            batch["stream_state"] = copy.deepcopy(self.stream.state_dict())
        return batch

    def _caption_batch(self, rows: list[_Row], require: bool) -> dict[str, torch.Tensor]:
        cached = rows[0].feature is not None
        batch = self.processor.build_training_inputs([r.text for r in rows], None if cached else [r.image for r in rows],
                                                     max_length=self.max_length)
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if cached:
            out["image_features"] = torch.stack([r.feature for r in rows])
        else:
            out["pixel_values"] = batch["pixel_values"]
        if require:
            out.update(self._targets(rows))
        return out

    def _targets(self, rows: list[_Row]) -> dict[str, torch.Tensor]:
        out = {"gen_targets": torch.stack([r.target for r in rows])}
        if self.pooled_emb_dim is not None:
            out["gen_pooled_targets"] = torch.stack([r.pooled_target for r in rows])
        return out

    def _mixed_batch(self, captions: list[_Row], interleaved: list[_Row], require: bool) -> dict[str, torch.Tensor]:
        parts = []
        if captions:
            parts.append(self.processor.build_training_inputs([r.text for r in captions], max_length=self.max_length))
        built = self.processor.build_interleaved_training_inputs([r.prompt for r in interleaved],
                                                                 max_length=self.interleaved_max_length)
        parts.append(built)
        length = max(p["input_ids"].shape[1] for p in parts)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.cat([F.pad(p["input_ids"], (0, length - p["input_ids"].shape[1]), value=pad) for p in parts])
        attention_mask = torch.cat([F.pad(p["attention_mask"], (0, length - p["attention_mask"].shape[1])) for p in parts])
        rows = captions + interleaved
        paired = [r.image is not None for r in rows]
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "interleaved": torch.tensor([False] * len(captions) + [True] * len(interleaved)), "paired": torch.tensor(paired)}
        if any(paired):
            stand_in = next(r.image for r in rows if r.image is not None)  # unpaired rows' slot, never read
            images = [r.image if r.image is not None else stand_in for r in rows]
            out["pixel_values"] = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        if "context_pixel_values" in built:
            out["context_pixel_values"] = built["context_pixel_values"]
        if require:
            out.update(self._targets(rows))
        return out


# ----- dataset builders ----------------------------------------------------------------------------


def load_cc3m_dataset(tsv_path: str | os.PathLike, image_dir: str | os.PathLike, targets_dir: str | os.PathLike | None | bool = True):
    r"""
    The reference's CC3M layout as a `datasets.Dataset`: a TSV with a `caption\timage` header and
    the images under `image_dir`. Columns: `caption`, `image` (full path) and, when targets are
    used, `gen_targets_path`.

    `targets_dir`: `True` (default) uses `<image_dir>/clip_embs/<image>.npy` (the reference's
    precomputed targets) when that folder exists; a path uses that folder; `None`/`False` none.
    Rows whose image file or (used) target file is missing are dropped here and counted in the log;
    unreadable files are caught later by the collator.
    """
    import datasets

    image_dir = os.fspath(image_dir)
    if targets_dir is True:
        candidate = os.path.join(image_dir, CLIP_EMBS_FOLDER)
        targets_dir = candidate if os.path.isdir(candidate) else None
    elif targets_dir is False:
        targets_dir = None
    rows: dict[str, list] = {"caption": [], "image": []}
    if targets_dir is not None:
        rows["gen_targets_path"] = []
    missing = Counter()
    csv.field_size_limit(1 << 30)  # a very long caption is a row like any other (the collator cuts its tokens)
    with open(tsv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if reader.fieldnames is None or not {"caption", "image"} <= set(reader.fieldnames):
            raise ValueError(f"{str(tsv_path)!r} must start with a `caption\\timage` header, got {reader.fieldnames}.")
        for row in reader:
            if not row.get("image") or not isinstance(row.get("caption"), str) or None in row:
                missing["bad_row"] += 1  # no tab, an empty image name, or extra fields
                continue
            image = os.path.join(image_dir, row["image"])
            if not os.path.isfile(image):
                missing["missing_image"] += 1
                continue
            if targets_dir is not None:
                target = os.path.join(os.fspath(targets_dir), f"{row['image']}.npy")
                if not os.path.isfile(target):
                    missing["missing_target"] += 1
                    continue
                rows["gen_targets_path"].append(target)
            rows["caption"].append(row["caption"])
            rows["image"].append(image)
    if missing:
        logger.warning(f"{str(tsv_path)!r}: dropped {dict(missing)} rows; kept {len(rows['caption'])}.")
    if not rows["caption"]:
        raise ValueError(f"{str(tsv_path)!r} has no usable rows (dropped {dict(missing)}).")
    return datasets.Dataset.from_dict(rows)


def prepare_interleaved_dataset(dataset):
    """An interleaved dataset (`gill_hf.interleaved` schema) for the collator: images undecoded, so
    that a corrupt one costs its example."""
    from .interleaved import interleaved_features

    columns = getattr(dataset, "column_names", None)
    if columns is not None and not {"segments", "target_caption"} <= set(columns):
        raise ValueError(f"An interleaved dataset needs columns 'segments' and 'target_caption'; it has {columns}.")
    features = getattr(dataset, "features", None)
    if features is None:
        return dataset
    undecoded = interleaved_features(decode=False)
    for name in ("segments", "target_image"):
        if name in features and features[name] != undecoded[name]:
            dataset = dataset.cast_column(name, undecoded[name])
    return dataset


def prepare_hf_dataset(dataset, image_column: str = "image", caption_column: str = "caption"):
    """Any `datasets` dataset (map-style or streaming) with image + caption columns -> the
    collator's columns. Images are left undecoded (`Image(decode=False)`) so that a corrupt one is
    skipped by the collator instead of failing inside the dataset."""
    import datasets

    columns = getattr(dataset, "column_names", None)
    if columns is not None and (image_column not in columns or caption_column not in columns):
        raise ValueError(f"The dataset needs columns {image_column!r} and {caption_column!r}; it has {columns}.")
    features = getattr(dataset, "features", None)
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    renames = {k: v for k, v in ((image_column, "image"), (caption_column, "caption")) if k != v}
    return dataset.rename_columns(renames) if renames else dataset


def _module_fingerprint(module: torch.nn.Module, *extra: str) -> str:
    """A deterministic fingerprint of a module's weights (plus `extra`), so that `datasets.map`
    reuses its cache across runs without dill-hashing the whole model through the closure."""
    import hashlib

    digest = hashlib.sha256("|".join(extra).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _fingerprint_kwargs(dataset, module: torch.nn.Module, *extra: str) -> dict:
    fingerprint = getattr(dataset, "_fingerprint", None)  # map-style datasets only
    return {"new_fingerprint": _module_fingerprint(module, fingerprint, *extra)} if fingerprint else {}


@torch.no_grad()
def encode_captions_for_sd(captions: str | Sequence[str], text_encoder, tokenizer) -> torch.Tensor:
    """SD's prompt encoding as the reference's preprocessing: pad/truncate to the tokenizer's
    `model_max_length` (77), no attention mask, `last_hidden_state`. `captions`: a str or any sequence of
    str (a `datasets` column too)."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device)).last_hidden_state


def precompute_gen_targets(dataset, text_encoder, tokenizer, batch_size: int = 128, caption_column: str = "caption",
                           target_column: str = "gen_targets", dtype=np.float16, **map_kwargs):
    """Adds `target_column` (SD text-encoder `last_hidden_state`, 77 x dim, float16 as the
    reference's files) with one batched `datasets.map`; the result is cached with the dataset."""
    text_encoder.eval()

    def encode(batch):
        embeds = encode_captions_for_sd(list(batch[caption_column]), text_encoder, tokenizer)
        return {target_column: embeds.float().cpu().numpy().astype(dtype)}

    map_kwargs = {**_fingerprint_kwargs(dataset, text_encoder, "gen_targets", caption_column, target_column,
                                        str(tokenizer.model_max_length), np.dtype(dtype).name), **map_kwargs}
    return dataset.map(encode, batched=True, batch_size=batch_size, **map_kwargs)


def cache_image_features(dataset, model, processor, batch_size: int = 64, image_column: str = "image",
                         features_column: str = "image_features", **map_kwargs):
    """Adds the frozen vision tower's pooled features (`model.get_image_features`) per example and
    drops the image column. Unreadable images are counted, logged and dropped."""
    device = next(model.vision_model.parameters()).device
    bad = Counter()

    @torch.no_grad()
    def encode(batch):
        images, ok = [], []
        for value in batch[image_column]:
            try:
                images.append(_open_image(value))
                ok.append(True)
            except Exception:
                ok.append(False)
        out = [None] * len(ok)
        if images:
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            feats = iter(model.get_image_features(pixels).pooler_output.float().cpu().numpy())
            out = [next(feats) if good else None for good in ok]
        bad["bad_image"] += ok.count(False)
        return {features_column: out}

    removed = [image_column] if image_column in (getattr(dataset, "column_names", None) or []) else None
    map_kwargs = {**_fingerprint_kwargs(dataset, model.vision_model, "image_features", image_column, features_column,
                                        repr(processor.image_processor.to_dict())), **map_kwargs}
    dataset = dataset.map(encode, batched=True, batch_size=batch_size, remove_columns=removed, **map_kwargs)
    dataset = dataset.filter(lambda example: example[features_column] is not None)
    if sum(bad.values()):
        logger.warning(f"cache_image_features: dropped {dict(bad)} examples with unreadable images.")
    return dataset


def precompute_decoder_targets(dataset, decoder, batch_size: int = 32, caption_column: str = "caption", dtype=np.float16,
                               **map_kwargs):
    """Adds `gen_targets` and, for decoders with a pooled vector, `gen_pooled_targets`, from the decoder
    pipeline's own `encode_prompt` (any family of `gill_hf.decoders`; SDXL, SD3), in one batched map."""
    from .decoders import encode_conditioning

    def encode(batch):
        conditioning, _ = encode_conditioning(decoder, list(batch[caption_column]))
        out = {"gen_targets": conditioning["prompt_embeds"].float().cpu().numpy().astype(dtype)}
        if "pooled_prompt_embeds" in conditioning:
            out["gen_pooled_targets"] = conditioning["pooled_prompt_embeds"].float().cpu().numpy().astype(dtype)
        return out

    encoders = torch.nn.ModuleList([m for m in decoder.components.values() if isinstance(m, torch.nn.Module)])
    map_kwargs = {**_fingerprint_kwargs(dataset, encoders, "decoder_targets", type(decoder).__name__, caption_column,
                                        np.dtype(dtype).name), **map_kwargs}
    return dataset.map(encode, batched=True, batch_size=batch_size, **map_kwargs)


def add_generation_targets(dataset, sd_model: str, batch_size: int = 128, caption_column: str = "caption"):
    """The dataset with the generation targets of decoder `sd_model` (a folder or repo id of any family in
    `gill_hf.decoders`). SD 1.x/2.x (or a folder holding only `text_encoder/` + `tokenizer/`): the text
    encoder's `last_hidden_state`, exactly as the reference; others: their pipeline's `encode_prompt`.
    The encoders run in fp32 whatever the folder stores (fp16 text encoders are slow on a CPU)."""
    return generation_target_adder(sd_model, batch_size)(dataset, caption_column)


def generation_target_adder(sd_model: str, batch_size: int = 128):
    """Loads decoder `sd_model`'s text encoders once and returns `add(dataset, caption_column)`, which
    is [`add_generation_targets`] with them (for callers that add targets to many datasets)."""
    from .decoders import decoder_family, load_decoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    text_only_folder = os.path.isdir(os.path.join(sd_model, "text_encoder")) and not os.path.isfile(os.path.join(sd_model, "model_index.json"))
    if text_only_folder or decoder_family(sd_model) == "stable-diffusion":
        from transformers import AutoTokenizer, CLIPTextModel

        encoder = CLIPTextModel.from_pretrained(sd_model, subfolder="text_encoder", dtype=torch.float32).to(device)
        tokenizer = AutoTokenizer.from_pretrained(sd_model, subfolder="tokenizer")
        return lambda dataset, caption_column="caption": precompute_gen_targets(
            dataset, encoder, tokenizer, batch_size=batch_size, caption_column=caption_column)
    decoder = load_decoder(sd_model, text_only=True, torch_dtype=torch.float32).to(device)
    return lambda dataset, caption_column="caption": precompute_decoder_targets(
        dataset, decoder, batch_size=min(batch_size, 32), caption_column=caption_column)


# ----- `gill-hf precompute-targets` ------------------------------------------------------------------


def load_saved_or_hub_dataset(name: str, config_name: str | None = None, split: str | None = "train", streaming: bool = False):
    """A folder written by `Dataset.save_to_disk` (e.g. by `gill-hf precompute-targets`), or
    anything `datasets.load_dataset` takes."""
    import datasets

    if os.path.isdir(name) and (os.path.isfile(os.path.join(name, "state.json")) or os.path.isfile(os.path.join(name, "dataset_dict.json"))):
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split or "train"]
        return dataset.to_iterable_dataset() if streaming else dataset
    return datasets.load_dataset(name, config_name, split=split, streaming=streaming)


def precompute_targets(output_dir: str | os.PathLike, sd_model: str, *, train_tsv: str | None = None,
                       image_dir: str | None = None, dataset_name: str | None = None, dataset_config_name: str | None = None,
                       split: str = "train", image_column: str = "image", caption_column: str = "caption",
                       batch_size: int = 128, model_name_or_path: str | None = None):
    """`gill-hf precompute-targets`: one data source (a CC3M-layout TSV + image folder, or a
    `datasets` dataset) with the SD text-encoder targets of its captions (of an interleaved
    dataset's `target_caption`s; and, given a GILL checkpoint, a caption dataset's cached vision
    features), saved with `save_to_disk`. Returns the dataset."""
    if bool(train_tsv) == bool(dataset_name):
        raise ValueError("Pass exactly one data source: `--train_tsv` (with `--image_dir`) or `--dataset_name`.")
    if train_tsv:
        if not image_dir:
            raise ValueError("`--train_tsv` needs `--image_dir` (the folder of its images).")
        dataset = load_cc3m_dataset(train_tsv, image_dir, targets_dir=None)
    else:
        dataset = load_saved_or_hub_dataset(dataset_name, dataset_config_name, split)
        if "segments" in (dataset.column_names or []):  # interleaved examples: the target caption's encoding
            dataset, caption_column = prepare_interleaved_dataset(dataset), "target_caption"
        else:
            dataset, caption_column = prepare_hf_dataset(dataset, image_column, caption_column), "caption"
    dataset = add_generation_targets(dataset, sd_model, batch_size, caption_column)
    if model_name_or_path and caption_column == "caption":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        from .modeling import GillForConditionalGeneration
        from .processing_gill import GillProcessor

        model = GillForConditionalGeneration.from_pretrained(model_name_or_path).to(device)
        dataset = cache_image_features(dataset, model, GillProcessor.from_pretrained(model_name_or_path))
    dataset.save_to_disk(os.fspath(output_dir))
    print(f"Saved {len(dataset)} examples with columns {dataset.column_names} to {output_dir}")
    return dataset


def _precompute_targets(namespace) -> None:
    if namespace.webdataset:
        if namespace.train_tsv or namespace.dataset_name or namespace.model_name_or_path:
            raise ValueError("`--webdataset` writes target shards only: it cannot be combined with `--train_tsv`, "
                             "`--dataset_name` or `--model_name_or_path`.")
        from .shards import precompute_shard_targets

        counts = precompute_shard_targets(namespace.webdataset, namespace.output_dir, namespace.sd_model,
                                          generation_target_adder, namespace.batch_size, namespace.num_proc)
        print(f"Target shards in {namespace.output_dir}: {counts}")
        return
    if namespace.num_proc > 1:
        raise ValueError("`--num_proc` splits `--webdataset` shards; the other sources are one `datasets.map`.")
    precompute_targets(namespace.output_dir, namespace.sd_model, train_tsv=namespace.train_tsv, image_dir=namespace.image_dir,
                       dataset_name=namespace.dataset_name, dataset_config_name=namespace.dataset_config_name,
                       split=namespace.split, image_column=namespace.image_column, caption_column=namespace.caption_column,
                       batch_size=namespace.batch_size, model_name_or_path=namespace.model_name_or_path)


def register_data_commands(subparsers) -> None:
    p = subparsers.add_parser("precompute-targets", help="Add SD text-encoder targets (and optionally cached vision "
                                                         "features) to a dataset and save it (arrow).")
    p.add_argument("--train_tsv", default=None, help="CC3M layout TSV (`caption\\timage`).")
    p.add_argument("--image_dir", default=None, help="Its image folder.")
    p.add_argument("--dataset_name", default=None, help="Or a `datasets` dataset / saved folder with image + caption columns.")
    p.add_argument("--webdataset", default=None, help="Or webdataset shards (img2dataset's {key}.jpg/.txt): a folder, glob or "
                                                      "comma-separated paths; writes one target shard per input shard.")
    p.add_argument("--num_proc", type=int, default=1, help="With --webdataset: local processes sharing the shards (under "
                                                           "`accelerate launch`, per launched process).")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="caption")
    p.add_argument("--sd_model", required=True, help="SD folder or hub id with text_encoder/ and tokenizer/.")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--model_name_or_path", default=None, help="A GILL checkpoint: also cache its frozen vision features.")
    p.add_argument("--output_dir", required=True, help="Where the dataset is saved (`gill-hf train --dataset_name` reads it; "
                                                       "with --webdataset, the folder `gill-hf train --targets_dir` reads).")
    p.set_defaults(func=_precompute_targets)


__all__ = [
    "CLIP_EMBS_FOLDER",
    "GillDataCollator",
    "add_generation_targets",
    "cache_image_features",
    "encode_captions_for_sd",
    "generation_target_adder",
    "load_cc3m_dataset",
    "precompute_decoder_targets",
    "precompute_gen_targets",
    "precompute_targets",
    "load_saved_or_hub_dataset",
    "prepare_hf_dataset",
    "prepare_interleaved_dataset",
    "register_data_commands",
]
