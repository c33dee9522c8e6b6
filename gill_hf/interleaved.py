"""Interleaved training examples (a context of text and images -> the image it should produce) and
readers for the real interleaved formats.

An example is a `datasets` row of `INTERLEAVED_FEATURES`:

- `segments`: the context in order, each `{"type": "text", "text": ...}` or `{"type": "image",
  "image": ...}` (the other field None);
- `target_caption`: the caption of the image to produce (its decoder text-encoder states are the
  generation target, precomputed like caption targets: `precompute_gen_targets(...,
  caption_column="target_caption")`);
- `target_image`: that image where known (the contrastive pair), else None.

`GillDataCollator` turns such rows into training rows (visual prefix at each context image, the
text, the `[IMG]` block at the end). Readers build them from real formats, never fetching an image:

- `read_vist`: VIST's SIS json (+ an image folder, optionally a DII json): per story and k, the
  first k (image, sentence) pairs and sentence k+1 -> image k+1 (GILL's VIST protocol);
- `read_obelics`: OBELICS documents (parallel `texts` / `images` lists);
- `read_mmc4`: MMC4 documents (`text_list` + `image_info[].matched_text_index`).

Document images are looked up by URL / name in a `Mapping` (`image_lookup_from_folder`,
`image_lookup_from_dataset`); an example whose image is missing is skipped and counted.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

VIST_IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".gif")


def interleaved_features(decode: bool = True):
    """The `datasets.Features` of interleaved examples."""
    import datasets

    image = datasets.Image(decode=decode)
    segment = {"type": datasets.Value("string"), "text": datasets.Value("string"), "image": image}
    return datasets.Features({"segments": datasets.List(segment), "target_caption": datasets.Value("string"),
                              "target_image": image})


def text_segment(text: str) -> dict:
    return {"type": "text", "text": text, "image": None}


def image_segment(image: Any) -> dict:
    """`image`: a PIL image, bytes, a path, or a `{"bytes", "path"}` cell."""
    if isinstance(image, bytes):
        image = {"bytes": image, "path": None}
    elif isinstance(image, (str, os.PathLike)):
        image = {"bytes": None, "path": os.fspath(image)}
    return {"type": "image", "text": None, "image": image}


def interleaved_example(segments: list[dict], target_caption: str, target_image: Any = None) -> dict:
    if not segments or not isinstance(target_caption, str) or not target_caption.strip():
        raise ValueError("An interleaved example needs segments and a non-empty `target_caption`.")
    return {"segments": segments, "target_caption": target_caption,
            "target_image": image_segment(target_image)["image"] if target_image is not None else None}


def chat_segments(messages: list[dict], tokenizer, images: list, add_generation_prompt: bool = True) -> list[dict]:
    """A chat (`role` + `content`: a string, or items `{"type": "text", "text"}` / `{"type": "image"}`)
    rendered through the LM's own chat template (`processing_gill.render_chat`, the rendering the
    processor's `apply_chat_template` and the chat demo use), as segments: each image item becomes an
    image segment (the next of `images`), the template's text around it text segments."""
    from .processing_gill import IMAGE_PLACEHOLDER, render_chat

    text, _ = render_chat(messages, tokenizer, add_generation_prompt=add_generation_prompt)
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"The messages hold {len(pieces) - 1} image items but {len(images)} images were given.")
    segments = []
    for i, piece in enumerate(pieces):
        if piece:
            segments.append(text_segment(piece))
        if i < len(images):
            segments.append(image_segment(images[i]))
    return segments


def segments_to_prompt(segments: Iterable[dict], open_image) -> list:
    """An example's segments as an interleaved prompt (strings and images), for the processor."""
    prompt = []
    for i, segment in enumerate(segments):
        if segment.get("type") == "text":
            if segment.get("text"):
                prompt.append(segment["text"])
        elif segment.get("type") == "image":
            prompt.append(open_image(segment.get("image")))
        else:
            raise ValueError(f"segment {i} has type {segment.get('type')!r}; expected 'text' or 'image'")
    return prompt


def _dataset(examples: list[dict], skipped: Counter, source: str):
    import datasets

    if skipped:
        logger.warning(f"{source}: skipped {dict(skipped)}; kept {len(examples)} examples.")
    if not examples:
        raise ValueError(f"{source} gave no usable example (skipped {dict(skipped)}).")
    dataset = datasets.Dataset.from_list(examples, features=interleaved_features())
    dataset.info.description = json.dumps({"source": source, "skipped": dict(skipped)})
    return dataset


# ----- VIST ------------------------------------------------------------------------------------------


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON (truncated?): {error}") from error


def vist_stories(sis_json: str | os.PathLike) -> dict[str, list[dict]]:
    """story_id -> its storylets ordered by `worker_arranged_photo_order`, from a SIS json."""
    data = _read_json(sis_json)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{os.fspath(sis_json)!r} has no 'annotations' list: not a VIST story-in-sequence file.")
    stories: dict[str, list[dict]] = {}
    for index, entry in enumerate(annotations):
        storylet = entry[0] if isinstance(entry, list) and entry else entry
        if not isinstance(storylet, dict) or not {"story_id", "photo_flickr_id", "worker_arranged_photo_order"} <= set(storylet):
            raise ValueError(f"{os.fspath(sis_json)!r}: annotations[{index}] is not a VIST storylet.")
        stories.setdefault(str(storylet["story_id"]), []).append(storylet)
    for story_id, storylets in stories.items():
        storylets.sort(key=lambda s: int(s["worker_arranged_photo_order"]))
    return stories


def vist_image_path(image_dir: str | os.PathLike, photo_id: str) -> Path | None:
    for extension in VIST_IMAGE_EXTENSIONS:
        path = Path(image_dir) / f"{photo_id}{extension}"
        if path.is_file():
            return path
    return None


def vist_sentence(storylet: dict, text_field: str = "original_text") -> str:
    return str(storylet.get(text_field) or storylet.get("text") or "").strip()


def read_vist(sis_json: str | os.PathLike, image_dir: str | os.PathLike, dii_json: str | os.PathLike | None = None, *,
              include_images: bool = True, text_field: str = "original_text", min_context: int = 1):
    """Interleaved examples from VIST's SIS json: for each story and k >= `min_context`, the segments
    `[image_1, sentence_1, ..., image_k, sentence_k, sentence_{k+1}]` -> image k+1 (with
    `include_images=False`, sentences only). `target_caption` is sentence k+1, or the photo's DII
    description when `dii_json` is given. Stories with a missing photo are skipped and counted."""
    stories = vist_stories(sis_json)
    descriptions = {}
    if dii_json is not None:
        for storylets in vist_stories(dii_json).values():
            for storylet in storylets:
                descriptions.setdefault(str(storylet["photo_flickr_id"]), vist_sentence(storylet, text_field))
    examples, skipped = [], Counter()
    for story_id, storylets in sorted(stories.items()):
        paths = [vist_image_path(image_dir, str(s["photo_flickr_id"])) for s in storylets]
        if len(storylets) != 5:
            skipped["incomplete_story"] += 1
            continue
        if any(p is None for p in paths):
            skipped["missing_image"] += 1
            continue
        sentences = [vist_sentence(s, text_field) for s in storylets]
        for k in range(min_context, 5):
            segments = []
            for i in range(k):
                segments += ([image_segment(paths[i])] if include_images else []) + [text_segment(sentences[i])]
            segments.append(text_segment(sentences[k]))
            caption = descriptions.get(str(storylets[k]["photo_flickr_id"])) or sentences[k]
            examples.append(interleaved_example(segments, caption, paths[k]))
    return _dataset(examples, skipped, f"VIST {os.fspath(sis_json)}")


# ----- web documents ----------------------------------------------------------------------------------------


def image_lookup_from_folder(folder: str | os.PathLike) -> dict[str, str]:
    """file name -> path for every file of `folder` (MMC4's `image_name`s; OBELICS URLs are matched
    by their last path component)."""
    return {p.name: str(p) for p in Path(folder).iterdir() if p.is_file()}


def image_lookup_from_dataset(dataset, key_column: str = "url", image_column: str = "image") -> dict[str, Any]:
    """key -> image cell from a `datasets` dataset holding the images as a bytes column keyed by URL."""
    if key_column not in dataset.column_names or image_column not in dataset.column_names:
        raise ValueError(f"The image dataset needs columns {key_column!r} and {image_column!r}; it has {dataset.column_names}.")
    import datasets

    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return {row[key_column]: row[image_column] for row in dataset}


def _lookup(images: Mapping[str, Any], key: str) -> Any:
    if key in images:
        return images[key]
    return images.get(key.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0])


def document_examples(items: list[tuple[str, Any]], images: Mapping[str, Any], skipped: Counter, max_context: int = 8) -> list[dict]:
    """From one document as ordered `("text", str)` / `("image", key)` items: for each image with
    a readable file and some context before it, the last `max_context` items before it -> that image,
    captioned by the text right after it (else right before it)."""
    examples = []
    for position, (kind, value) in enumerate(items):
        if kind != "image":
            continue
        after = next((v for k, v in items[position + 1:position + 2] if k == "text"), None)
        before = next((v for k, v in items[position - 1:position] if k == "text"), None) if position else None
        caption = after or before
        context = items[max(0, position - max_context):position]
        if not caption or not context:
            skipped["no_caption_or_context"] += 1
            continue
        target = _lookup(images, value)
        if target is None:
            skipped["missing_image"] += 1
            continue
        segments = []
        for kind_, value_ in context:
            if kind_ == "text":
                segments.append(text_segment(value_))
                continue
            cell = _lookup(images, value_)
            if cell is None:
                skipped["missing_context_image"] += 1
                continue  # a context image that is not there is left out, not invented
            segments.append(image_segment(cell))
        examples.append(interleaved_example(segments, caption, target))
    return examples


def read_obelics(documents, images: Mapping[str, Any], max_context: int = 8):
    """Interleaved examples from OBELICS rows (`texts` / `images` parallel lists, exactly one of
    each pair non-null); images come from `images` (URL -> file or bytes), never fetched."""
    examples, skipped = [], Counter()
    for index, row in enumerate(documents):
        texts, urls = row.get("texts"), row.get("images")
        if not isinstance(texts, list) or not isinstance(urls, list) or len(texts) != len(urls):
            raise ValueError(f"OBELICS row {index}: `texts` and `images` must be parallel lists.")
        items = []
        for text, url in zip(texts, urls):
            if (text is None) == (url is None):
                raise ValueError(f"OBELICS row {index}: each position holds exactly one of a text and an image.")
            items.append(("text", text) if text is not None else ("image", url))
        examples += document_examples(items, images, skipped, max_context)
    return _dataset(examples, skipped, "OBELICS")


def read_mmc4(jsonl_path: str | os.PathLike, images: Mapping[str, Any], max_context: int = 8):
    """Interleaved examples from MMC4 JSON lines: each image is placed right before its matched
    sentence (`text_list[matched_text_index]`), which becomes its target caption."""
    examples, skipped = [], Counter()
    with open(jsonl_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                document = json.loads(line)
                sentences, infos = document["text_list"], document.get("image_info", [])
                placed = {int(info["matched_text_index"]): info["image_name"] for info in infos}
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{os.fspath(jsonl_path)!r} line {number} is not an MMC4 document: {error!r}") from error
            items = []
            for i, sentence in enumerate(sentences):
                if i in placed:
                    items.append(("image", placed[i]))
                items.append(("text", sentence))
            examples += document_examples(items, images, skipped, max_context)
    return _dataset(examples, skipped, f"MMC4 {os.fspath(jsonl_path)}")


# ----- mixing caption rows and interleaved rows --------------------------------------------------------------


def parse_group_weights(spec: str, argument: str = "interleaved_group_weights") -> dict[str, float]:
    """`"combine=3,edit-colour=2"` -> `{"combine": 3.0, "edit-colour": 2.0}` (weights >= 0)."""
    weights = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            weight = float(value) if sep and name.strip() else None
        except ValueError:
            weight = None
        if weight is None or not weight >= 0:
            raise ValueError(f"`{argument}` takes `group=weight` items with weights >= 0, separated by commas; got {item!r}.")
        weights[name.strip()] = weight
    return weights


def group_weighted_order(groups: list[str], weights: Mapping[str, float], seed: int = 0) -> list[int]:
    """An order of the row indices `0..len(groups)-1` (as long as `groups`) in which a row of group `g`
    appears `weights[g]` times as often as a row of weight 1 (groups not named weigh 1; weight 0
    leaves a group out). Within a group the rows are shuffled and cycled, so the draws of any two rows
    of a group differ by at most one; the whole order is shuffled.
    Deterministic in `seed`."""
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    unknown = sorted(set(weights) - set(by_group))
    if unknown:
        raise ValueError(f"`interleaved_group_weights` names groups with no rows: {unknown}; the groups are {sorted(by_group)}.")
    mass = {group: weights.get(group, 1.0) * len(rows) for group, rows in by_group.items()}
    total = sum(mass.values())
    if total <= 0:
        raise ValueError("`interleaved_group_weights` gives every group weight 0.")
    # Largest-remainder rounding: the counts add up to len(groups) exactly.
    exact = {group: len(groups) * m / total for group, m in mass.items()}
    counts = {group: int(value) for group, value in exact.items()}
    for group in sorted(exact, key=lambda g: counts[g] - exact[g])[:len(groups) - sum(counts.values())]:
        counts[group] += 1
    rng = random.Random(seed)
    order = []
    for group in sorted(by_group):
        rows = list(by_group[group])
        rng.shuffle(rows)
        order += [rows[i % len(rows)] for i in range(counts[group])]
    rng.shuffle(order)
    return order


class MixedDataset:
    """Caption rows and interleaved rows in one map-style dataset at a stated ratio: every caption
    row once per epoch, plus `round(n_captions * ratio / (1 - ratio))` interleaved positions (cycling
    through the interleaved rows, or through `order`, e.g. a `group_weighted_order`), so that `ratio`
    of each epoch's rows are interleaved."""

    def __init__(self, captions, interleaved, ratio: float, order: list[int] | None = None):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"`interleaved_ratio` must lie in (0, 1), got {ratio!r}.")
        if len(captions) == 0 or len(interleaved) == 0:
            raise ValueError("Both the caption and the interleaved dataset must hold rows.")
        if order is not None and (not order or not all(0 <= i < len(interleaved) for i in order)):
            raise ValueError(f"`order` must be a non-empty list of interleaved row indices below {len(interleaved)}.")
        self.captions, self.interleaved, self.ratio = captions, interleaved, ratio
        self.order = list(order) if order is not None else None
        self.num_interleaved = max(1, round(len(captions) * ratio / (1 - ratio)))

    def __len__(self) -> int:
        return len(self.captions) + self.num_interleaved

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < len(self.captions):
            return self.captions[index]
        position = index - len(self.captions)
        if self.order is not None:
            return self.interleaved[self.order[position % len(self.order)]]
        return self.interleaved[position % len(self.interleaved)]


__all__ = [
    "MixedDataset",
    "chat_segments",
    "document_examples",
    "group_weighted_order",
    "image_lookup_from_dataset",
    "image_lookup_from_folder",
    "image_segment",
    "interleaved_example",
    "interleaved_features",
    "parse_group_weights",
    "read_mmc4",
    "read_obelics",
    "read_vist",
    "segments_to_prompt",
    "text_segment",
    "vist_stories",
]
