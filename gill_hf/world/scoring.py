"""Reading and scoring outputs against world scenes, for everyone who judges GILL-tiny or the world
SD (the demo, `gill-hf eval-world`, the world models' reports, tests).

- `read_single_objects`: the world judge's reading of single-object images (PIL images or uint8
  arrays): per image, the object at the most confident position, its shape / colour / size.
- `score_readings`: per-attribute accuracy of readings against the true attributes, and all four.
- `caption_check`: whether a caption describes a single-object scene, read the way the demo and
  eval-world caption: the first sentence only, naming the scene's colour and shape and no other.
"""

from __future__ import annotations

import re

import numpy as np

from .render import COLOUR_NAMES, POSITIONS, SHAPES, SIZES

ATTRIBUTES = ("shape", "colour", "size", "position")
_SHAPE_FORMS = {form: shape for shape in SHAPES for form in (shape, shape + "s", shape + "es")}


def scene_attributes(labels: dict, i: int = 0) -> dict:
    """The attributes of object `i` of a scene's labels (`Scene.labels()` or a dataset row)."""
    return {"shape": labels["shapes"][i], "colour": labels["colours"][i], "size": labels["sizes"][i],
            "position": labels["positions"][i]}


def describe(attributes: dict) -> str:
    return f"{attributes['size']} {attributes['colour']} {attributes['shape']}, {attributes['position']}"


def read_single_objects(judge, images) -> list[dict]:
    """The judge's reading of single-object images (a list of PIL images, or a uint8 array
    `(n, 32, 32, 3)`): the most confident position holds the object."""
    if isinstance(images, np.ndarray):
        arrays = images
    else:
        arrays = np.stack([np.asarray(im.convert("RGB").resize((32, 32))) for im in images]).astype(np.uint8)
    p = judge.predict(arrays)
    k = p["present"].argmax(1)
    counts = (p["present"] > 0.5).sum(1)
    return [{"shape": SHAPES[p["shape"][i, k[i]]], "colour": COLOUR_NAMES[p["colour"][i, k[i]]],
             "size": SIZES[p["size"][i, k[i]]], "position": POSITIONS[k[i]], "count": int(counts[i])}
            for i in range(len(arrays))]


def score_readings(readings: list[dict], truths: list[dict]) -> dict[str, float]:
    """Accuracy of each attribute, of all four together, the share of images the judge sees exactly
    one object in (`one_object`, single-object truths), and the count."""
    if len(readings) != len(truths):
        raise ValueError(f"{len(readings)} readings for {len(truths)} truths.")
    result = {attr: float(np.mean([r[attr] == t[attr] for r, t in zip(readings, truths)])) for attr in ATTRIBUTES}
    result["all_four"] = float(np.mean([all(r[a] == t[a] for a in ATTRIBUTES) for r, t in zip(readings, truths)]))
    if all("count" in r for r in readings):
        result["one_object"] = float(np.mean([r["count"] == 1 for r in readings]))
    result["n"] = len(truths)
    return result


def first_sentence(text: str) -> str:
    """The text up to and including its first '.', '!' or '?' (the captioning protocol's answer)."""
    match = re.search(r"[.!?]", text)
    return text[: match.end()] if match else text


def caption_check(text: str, attributes: dict) -> dict[str, bool]:
    """Whether the caption's first sentence names the scene's colour and its shape, and names no
    other colour or shape (an invented second object fails)."""
    words = re.findall(r"[a-z]+", first_sentence(text).lower())
    colours = {w for w in words if w in COLOUR_NAMES}
    shapes = {_SHAPE_FORMS[w] for w in words if w in _SHAPE_FORMS}
    return {"colour": colours == {attributes["colour"]}, "shape": shapes == {attributes["shape"]}}


__all__ = ["ATTRIBUTES", "caption_check", "describe", "first_sentence", "read_single_objects", "scene_attributes",
           "score_readings"]
