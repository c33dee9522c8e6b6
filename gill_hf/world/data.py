"""Splits of the procedural world, as numpy arrays (for training) or a `datasets.Dataset`.

Example `i` of split `s` is drawn from its own RNG seeded by the string "seed/s/i", so any
example can be regenerated alone and two splits never share an RNG stream. The train and
validation splits exclude every scene that contains a held-out shape/colour pair; the
"heldout" split contains only such scenes.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np

from .render import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption_scene,
    render_array,
    render_scene,
    sample_scene,
)

SPLITS = ("train", "validation", "heldout")
# "judge" is the judge's own training stream: every combination, held-out pairs included,
# because the judge must read the compositions that the judged models never saw.
STREAMS = SPLITS + ("judge",)
# Bump when rendering or captions change, so cached arrays are never silently stale.
WORLD_VERSION = 1


def cache_dir() -> Path:
    root = os.environ.get("GILL_HF_WORLD_CACHE", os.path.expanduser("~/.cache/gill_hf_world"))
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def example_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{split}/{index}")


def sample_example(
    seed: int, split: str, index: int, num_objects: int | None = None
) -> tuple[Scene, str]:
    """The (scene, caption) of one example; rejection keeps the split's pair rule exact."""
    if split not in STREAMS:
        raise ValueError(f"unknown split {split!r}; expected one of {STREAMS}")
    rng = example_rng(seed, split, index)
    want_heldout = split == "heldout"
    while True:
        scene = sample_scene(rng, num_objects)
        if split == "judge" or scene.has_heldout_pair() == want_heldout:
            return scene, caption_scene(scene, rng)


def generate_arrays(
    n: int, split: str = "train", seed: int = 0, num_objects: int | None = None,
    start: int = 0, use_cache: bool = True,
) -> dict:
    """n examples as {'images': uint8 (n,32,32,3), 'captions': [...], 'labels': [...]}.

    Cached under the world cache dir, since the training commands reuse the same sets.
    """
    key = f"v{WORLD_VERSION}-{split}-s{seed}-n{n}-o{num_objects}-st{start}"
    path = cache_dir() / f"arrays-{key}.npz"
    if use_cache and path.exists():
        z = np.load(path, allow_pickle=True)
        return {"images": z["images"], "captions": list(z["captions"]), "labels": list(z["labels"])}
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    captions, labels = [], []
    for j in range(n):
        scene, cap = sample_example(seed, split, start + j, num_objects)
        images[j] = render_array(scene)
        captions.append(cap)
        labels.append(scene.labels())
    out = {"images": images, "captions": captions, "labels": labels}
    if use_cache:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, captions=np.array(captions, dtype=object),
                 labels=np.array(labels, dtype=object))
        os.replace(tmp, path)
    return out


def generate_dataset(
    n: int, split: str = "train", seed: int = 0, num_objects: int | None = None, start: int = 0
):
    """The split as a `datasets.Dataset` with an Image feature and the exact labels."""
    from datasets import Dataset, Features, Image, Sequence, Value

    features = Features({
        "image": Image(),
        "caption": Value("string"),
        "split": Value("string"),
        "index": Value("int64"),
        "background": Value("string"),
        "num_objects": Value("int32"),
        "shapes": Sequence(Value("string")),
        "colours": Sequence(Value("string")),
        "sizes": Sequence(Value("string")),
        "positions": Sequence(Value("string")),
    })

    def rows():
        for j in range(n):
            scene, cap = sample_example(seed, split, start + j, num_objects)
            buf = io.BytesIO()
            # PNG without timestamps is a pure function of the pixels: same seed, same bytes.
            render_scene(scene).save(buf, format="PNG")
            yield {"image": {"bytes": buf.getvalue(), "path": None}, "caption": cap,
                   "split": split, "index": start + j, **scene.labels()}

    return Dataset.from_list(list(rows()), features=features)


def fingerprint(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- label ids

def label_ids(labels: list[dict]) -> dict[str, np.ndarray]:
    """Per-position targets (what the judge predicts): presence and attribute ids.

    Returns arrays of shape (n, len(POSITIONS)); attribute ids are -100 (ignored by
    cross-entropy) where no object stands.
    """
    n, p = len(labels), len(POSITIONS)
    out = {k: np.full((n, p), -100, dtype=np.int64) for k in ("shape", "colour", "size")}
    out["present"] = np.zeros((n, p), dtype=np.float32)
    out["background"] = np.array([BACKGROUND_NAMES.index(l["background"]) for l in labels])
    for i, lab in enumerate(labels):
        for sh, co, si, po in zip(lab["shapes"], lab["colours"], lab["sizes"], lab["positions"]):
            k = POSITIONS.index(po)
            out["present"][i, k] = 1.0
            out["shape"][i, k] = SHAPES.index(sh)
            out["colour"][i, k] = COLOUR_NAMES.index(co)
            out["size"][i, k] = SIZES.index(si)
    return out
