"""Context-dependent world examples with exact labels: the final scene depends on earlier sentences,
earlier images or the dialogue so far (in the world's own vocabulary).

Kinds (every final scene is one object; its attributes are exact):

- stories (text only): `recolour`, `resize`, `move`, `reshape` ("it" changes), `other-one` (two
  objects, one leaves: draw the other one), `distractor` (a named object to forget), `closing` (a
  change, then a sentence that adds nothing), `two-step` (two changes; only in `context_test`);
- image + edit instruction: `edit-colour`, `edit-shape`, `edit-size`, `edit-position`;
- two images: `combine` (the first object in the colour of the second);
- `dialogue`: a chat (the LM's own template) whose last user turn edits the scene shown earlier.

Splits: `train` and `validation` share the training phrasings; `context_test` uses phrasings never
seen in training (and the kind `two-step`). No split uses the world's held-out shape/colour pairs,
so `context_test` tests context, not composition (the world's `heldout` split does that).

Example `i` of a split is drawn from its own RNG seeded by "context/seed/split/i". Each row holds the
interleaved schema (`segments`, `target_caption`, `target_image`) plus `kind`, the final object's
`shape` / `colour` / `size` / `position`, `context_text` (the text segments, plain) and
`captioned_text` (the same with each image replaced by its exact caption): the references of
eval-world's text-only baselines.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import replace

from .render import (COLOUR_NAMES, CORNERS, HELDOUT_PAIRS, POSITION_PHRASES, POSITIONS, SHAPES, SIZE_WORDS, SIZES,
                     BACKGROUND_NAMES, Scene, WorldObject, render_scene)

SPLITS = ("train", "validation", "context_test")
STORY_KINDS = ("recolour", "resize", "move", "reshape", "other-one", "distractor", "closing")
IMAGE_KINDS = ("edit-colour", "edit-shape", "edit-size", "edit-position", "combine", "dialogue")
TEST_ONLY_KINDS = ("two-step",)
TRAIN_KINDS = STORY_KINDS + IMAGE_KINDS
TEST_KINDS = STORY_KINDS + TEST_ONLY_KINDS + IMAGE_KINDS

MOVE_PHRASES = {
    "center": ("to the center", "to the middle"),
    "top left": ("to the top left corner", "to the upper left"),
    "top right": ("to the top right corner", "to the upper right"),
    "bottom left": ("to the bottom left corner", "to the lower left"),
    "bottom right": ("to the bottom right corner", "to the lower right"),
}

# Phrasings: (training, test). A test phrasing never occurs in `train` or `validation`.
PHRASES = {
    "intro": (("{NP} sits {pos}.", "There is {np} {pos}.", "{NP} is {pos}."),
              ("{Pos} you can see {np}.", "Picture {np} {pos}.")),
    "recolour": (("Then it turns {colour}.", "It becomes {colour}.", "Someone paints it {colour}."),
                 ("Afterwards its colour is {colour}.", "Its colour changes to {colour}.")),
    "resize": (("Then it becomes {size}.", "It gets {comparative}.", "Now it is {size}."),
               ("Afterwards it is {size}.", "Someone makes it {comparative}.")),
    "move": (("Then it moves {move}.", "It slides {move}.", "Someone pushes it {move}."),
             ("Afterwards it is {pos}.", "Later it travels {move}.")),
    "reshape": (("Then it turns into {a_shape}.", "It becomes {a_shape}.", "Someone reshapes it into {a_shape}."),
                ("Afterwards it is {a_shape}.", "Its shape changes to {a_shape}.")),
    "pair": (("There is {np1} {pos1} and {np2} {pos2}.", "{NP1} sits {pos1}, {np2} {pos2}."),
             ("{Pos1} you can see {np1}, and {pos2} {np2}.",)),
    "leave": (("The {shape1} goes away. Show the other one.", "The {colour1} one leaves; only the other one stays."),
              ("Remove the {shape1}; the other one remains.",)),
    "distractor": (("Forget {np_d}. {NP} sits {pos}.", "Not {np_d}, but {np} {pos}."),
                   ("Ignore {np_d}. Picture {np} {pos}.", "{NP_d} was there yesterday. Today there is only {np} {pos}.")),
    "closing": (("That is all.", "Nothing else happens."), ("The end.", "It stays like that.")),
    "edit-colour": (("The same shape, but {colour}.", "Make it {colour}."),
                    ("Keep everything, but paint it {colour}.", "Now show it in {colour}.")),
    "edit-shape": (("The same colour, but {a_shape}.", "Make it {a_shape}."),
                   ("Turn it into {a_shape}.", "Keep the colour, change it to {a_shape}.")),
    "edit-size": (("Make it {comparative}.", "The same, but {size}."),
                  ("Now draw it {size}.", "Change only its size: {size}.")),
    "edit-position": (("Move it {move}.", "The same, but {pos}."),
                      ("Put it {pos} instead.", "Shift it {move}.")),
    "combine": (("The shape of the first in the colour of the second.", "Draw the first one in the colour of the second."),
                ("Use the colour of the second picture for the first shape.",)),
    "dialogue_open": (("Draw {np} {pos}.", "Show me {np} {pos}."), ("Could you draw {np} {pos}?",)),
    "dialogue_question": (("What is in this picture?", "Describe this image."), ("What do you see here?",)),
}
# The "wide" training pool: more ways to say each image instruction, none of them a test phrasing (a
# model that saw two phrasings per kind reads the image worse under a new one: `context_test`).
WIDE_PHRASES = {
    "edit-colour": ("Colour it {colour}.", "Same thing in {colour}.", "I want it {colour}.", "Paint it {colour} instead.",
                    "Change the colour to {colour}.", "Redo it in {colour}.", "Only the colour changes: {colour}.",
                    "Show me the {colour} version."),
    "edit-shape": ("Replace it with {a_shape}.", "Draw {a_shape} instead.", "Same colour, {a_shape} this time.",
                   "I want {a_shape} here.", "Only the shape changes: {a_shape}.", "Redo it as {a_shape}."),
    "edit-size": ("Draw the same thing but {size}.", "I want it {comparative}.", "It should be {size}.", "Resize it: {size}.",
                  "Same picture, but {comparative}.", "Show me the {size} version.", "Only the size changes: {size}.",
                  "Redo it {comparative}."),
    "edit-position": ("Place it {pos}.", "Drag it {move}.", "Same object, but {pos}.", "Relocate it {move}.",
                      "Only the place changes: {pos}.", "Redo it {pos}."),
    "combine": ("Paint the first shape with the second one's colour.", "The first object, coloured like the second.",
                "Take the shape from the first image and the colour from the second.",
                "Recolour the first one with the colour of the second."),
}
DIALOGUE_EDITS = (  # per edited attribute: (training phrasing, test phrasing)
    {"colour": "Now make it {colour}.", "size": "Make it {comparative}.", "position": "Now move it {move}."},
    {"colour": "Can you change its colour to {colour}?", "size": "Could you make it {comparative}?",
     "position": "Could you move it {move}?"},
)
# The "composed" pool: each image edit also said as opener + instruction + ending (hundreds of ways;
# drawn half the time, the "wide" pool otherwise). With two, then ten phrasings an edit, the mapper's
# output still confused the input's shape with another under a new phrasing (eval-world's kept shape).
_OPENERS = ("", "Now ", "Okay, ", "Next, ", "Please ", "This time, ", "Alright, ", "Then ")
_ENDINGS = (".", " instead.", " this time.", ", please.", " and leave the rest.", ", nothing else.")
_INSTRUCTIONS = {
    "edit-colour": ("make it {colour}", "paint it {colour}", "colour it {colour}", "turn it {colour}", "draw it in {colour}",
                    "render it in {colour}", "give it a {colour} colour", "change its colour to {colour}",
                    "recolour it {colour}", "let it be {colour}", "use {colour} for it", "switch the colour to {colour}"),
    "edit-shape": ("make it {a_shape}", "turn it into {a_shape}", "draw {a_shape} in its place", "change it into {a_shape}",
                   "reshape it into {a_shape}", "swap the shape for {a_shape}", "let it be {a_shape}",
                   "give it the shape of {a_shape}", "redraw it as {a_shape}", "render it as {a_shape}"),
    "edit-size": ("make it {comparative}", "draw it {size}", "render it {size}", "make it {size}", "scale it to {size}",
                  "resize it to {size}", "let it be {size}", "give me a {comparative} one", "redraw it {comparative}",
                  "change its size to {size}"),
    "edit-position": ("move it {move}", "put it {pos}", "place it {pos}", "drag it {move}", "slide it {move}",
                      "shift it {move}", "draw it {pos}", "render it {pos}", "let it sit {pos}", "redraw it {pos}"),
}


def template_pattern(template: str) -> re.Pattern:
    """A phrasing template as a regex that finds its sayings: its literal parts, any text in its slots."""
    return re.compile(".+?".join(re.escape(part) for part in re.split(r"\{[^}]+\}", template)), re.IGNORECASE)


def _composed_phrases() -> dict[str, tuple[str, ...]]:
    """Every opener x instruction x ending, minus those a test phrasing's pattern finds in."""
    tests = [template_pattern(t) for _, phrasings in PHRASES.values() for t in phrasings]
    tests += [template_pattern(t) for t in DIALOGUE_EDITS[1].values()]
    composed = {}
    for key, instructions in _INSTRUCTIONS.items():
        sayings = (opener + instruction + ending for opener in _OPENERS for instruction in instructions
                   for ending in _ENDINGS if not (opener == "Please " and ending == ", please."))
        composed[key] = tuple(s[0].upper() + s[1:] for s in sayings if not any(t.search(s) for t in tests))
    return composed


COMPOSED_PHRASES = _composed_phrases()
PHRASINGS = ("base", "wide", "composed")  # training pools: PHRASES' training phrasings, plus WIDE_PHRASES, plus COMPOSED_PHRASES


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _np(rng: random.Random, o: WorldObject) -> str:
    phrase = f"{rng.choice(SIZE_WORDS[o.size])} {o.colour} {o.shape}"
    return f"{_article(phrase)} {phrase}"


def exact_caption(o: WorldObject) -> str:
    """The canonical caption of a single-object scene (the generation target and the oracle's prompt)."""
    phrase = f"{o.size} {o.colour} {o.shape}"
    return f"{_article(phrase)} {phrase} {POSITION_PHRASES[o.position][0]}"


def _object(rng: random.Random, position: str | None = None, **fixed) -> WorldObject:
    """A random object (jittered like the world's scenes) that is no held-out shape/colour pair."""
    while True:
        o = WorldObject(shape=fixed.get("shape", rng.choice(SHAPES)), colour=fixed.get("colour", rng.choice(COLOUR_NAMES)),
                        size=fixed.get("size", rng.choice(SIZES)), position=position or rng.choice(POSITIONS),
                        dx=rng.uniform(-0.75, 0.75), dy=rng.uniform(-0.75, 0.75), scale=rng.uniform(0.94, 1.06))
        if (o.shape, o.colour) not in HELDOUT_PAIRS:
            return o


def _changed(rng: random.Random, o: WorldObject, attribute: str) -> WorldObject:
    """`o` with a different value of `attribute` (never a held-out pair)."""
    vocab = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZES, "position": POSITIONS}[attribute]
    while True:
        value = rng.choice([v for v in vocab if v != getattr(o, attribute)])
        new = replace(o, **{attribute: value})
        if (new.shape, new.colour) not in HELDOUT_PAIRS:
            return new


def _words(rng: random.Random, o: WorldObject, before: WorldObject | None = None) -> dict:
    """Template slots describing `o` (and, for size changes, the comparative from `before`)."""
    pos = rng.choice(POSITION_PHRASES[o.position])
    comparative = "bigger" if before is not None and o.size == "large" and before.size == "small" else "smaller"
    return {"np": _np(rng, o), "NP": _np(rng, o).capitalize(), "pos": pos, "Pos": pos.capitalize(), "colour": o.colour,
            "size": rng.choice(SIZE_WORDS[o.size]), "comparative": comparative, "move": rng.choice(MOVE_PHRASES[o.position]),
            "a_shape": f"{_article(o.shape)} {o.shape}", "shape": o.shape}


def _phrase(rng: random.Random, key: str, pool: str, **slots) -> str:
    """A phrasing of `key` from `pool`: "test", "base" (training), "wide" (training + WIDE_PHRASES) or
    "composed" (half the time COMPOSED_PHRASES where `key` has them, else as "wide")."""
    if pool == "composed" and key in COMPOSED_PHRASES and rng.random() < 0.5:
        return rng.choice(COMPOSED_PHRASES[key]).format(**slots)
    choices = PHRASES[key][1] if pool == "test" else PHRASES[key][0] + (WIDE_PHRASES.get(key, ()) if pool != "base" else ())
    return rng.choice(choices).format(**slots)


def _single_change(rng, pool, kind) -> tuple[list, WorldObject]:
    attribute = {"recolour": "colour", "resize": "size", "move": "position", "reshape": "shape"}[kind]
    start = _object(rng)
    final = _changed(rng, start, attribute)
    text = _phrase(rng, "intro", pool, **_words(rng, start)) + " " + _phrase(rng, kind, pool, **_words(rng, final, start))
    return [("text", text)], final


CHANGE_KINDS = {"colour": "recolour", "size": "resize", "position": "move", "shape": "reshape"}


def story_frames(rng: random.Random, num_frames: int = 5, pool: str = "base") -> list[tuple[str, WorldObject]]:
    """A story of `num_frames` sentences, each with the object it leaves: the first introduces an
    object, each next changes one attribute of "it" (never the one changed just before). Every
    frame after the first is ambiguous alone; the whole story fixes it. `pool` picks the phrasings:
    "base", "wide" or "composed" (training) or "test"."""
    obj = _object(rng)
    frames = [(_phrase(rng, "intro", pool, **_words(rng, obj)), obj)]
    last = None
    for _ in range(num_frames - 1):
        attribute = rng.choice([a for a in CHANGE_KINDS if a != last])
        new = _changed(rng, obj, attribute)
        frames.append((_phrase(rng, CHANGE_KINDS[attribute], pool, **_words(rng, new, obj)), new))
        obj, last = new, attribute
    return frames


def _story(rng: random.Random, kind: str, pool: str) -> tuple[list, WorldObject]:
    if kind in ("recolour", "resize", "move", "reshape"):
        return _single_change(rng, pool, kind)
    if kind == "closing":
        segments, final = _single_change(rng, pool, rng.choice(("recolour", "resize", "move", "reshape")))
        return [("text", segments[0][1] + " " + _phrase(rng, "closing", pool))], final
    if kind == "two-step":
        start = _object(rng)
        middle = _changed(rng, start, rng.choice(("colour", "size", "shape")))
        last_attribute = rng.choice(("position", "colour")) if middle.colour == start.colour else "position"
        final = _changed(rng, middle, last_attribute)
        first = _phrase(rng, "intro", pool, **_words(rng, start))
        kind_of = {"colour": "recolour", "size": "resize", "shape": "reshape"}
        changed = next(a for a in ("colour", "size", "shape") if getattr(middle, a) != getattr(start, a))
        second = _phrase(rng, kind_of[changed], pool, **_words(rng, middle, start))
        third = (_phrase(rng, "move", pool, **_words(rng, final)) if last_attribute == "position"
                 else _phrase(rng, "recolour", pool, **_words(rng, final)))
        return [("text", f"{first} {second} {third}")], final
    if kind == "other-one":
        first_pos, second_pos = rng.sample(CORNERS, 2)
        leaving = _object(rng, first_pos)
        staying = _object(rng, second_pos)
        while staying.shape == leaving.shape or staying.colour == leaving.colour:
            staying = _object(rng, second_pos)
        a, b = (leaving, staying) if rng.random() < 0.5 else (staying, leaving)
        wa, wb = _words(rng, a), _words(rng, b)
        pair = _phrase(rng, "pair", pool, np1=wa["np"], NP1=wa["NP"], pos1=wa["pos"], Pos1=wa["Pos"],
                       np2=wb["np"], pos2=wb["pos"])
        leave = _phrase(rng, "leave", pool, shape1=leaving.shape, colour1=leaving.colour)
        return [("text", f"{pair} {leave}")], staying
    if kind == "distractor":
        final = _object(rng)
        other = _object(rng)
        while other.shape == final.shape:
            other = _object(rng)
        slots = _words(rng, final)
        text = _phrase(rng, "distractor", pool, np_d=_np(rng, other), NP_d=_np(rng, other).capitalize(), **slots)
        return [("text", text)], final
    raise ValueError(f"unknown story kind {kind!r}")


def _image_kind(rng: random.Random, kind: str, pool: str) -> tuple[list, WorldObject, list[Scene]]:
    background = rng.choice(BACKGROUND_NAMES)
    source = _object(rng)
    scene = Scene(background, (source,))
    if kind.startswith("edit-"):
        attribute = {"edit-colour": "colour", "edit-shape": "shape", "edit-size": "size", "edit-position": "position"}[kind]
        final = _changed(rng, source, attribute)
        return [("image", scene), ("text", _phrase(rng, kind, pool, **_words(rng, final, source)))], final, [scene]
    if kind == "combine":
        donor = _object(rng)
        while donor.colour == source.colour or (source.shape, donor.colour) in HELDOUT_PAIRS:
            donor = _object(rng)
        second = Scene(rng.choice(BACKGROUND_NAMES), (donor,))
        final = replace(source, colour=donor.colour)
        return [("image", scene), ("image", second), ("text", _phrase(rng, "combine", pool))], final, [scene, second]
    raise ValueError(f"unknown image kind {kind!r}")


def _dialogue(rng: random.Random, pool: str) -> tuple[list, WorldObject, list[Scene]]:
    """Chat messages (`role`, `content` items of type text / image), the last user turn an edit."""
    source = _object(rng)
    scene = Scene(rng.choice(BACKGROUND_NAMES), (source,))
    attribute = rng.choice(("colour", "size", "position"))
    final = _changed(rng, source, attribute)
    edit = DIALOGUE_EDITS[1 if pool == "test" else 0][attribute].format(**_words(rng, final, source))
    if rng.random() < 0.5:  # the user asks for a picture, the assistant shows one
        messages = [{"role": "user", "content": [{"type": "text", "text": _phrase(rng, "dialogue_open", pool, **_words(rng, source))}]},
                    {"role": "assistant", "content": [{"type": "image"}]}]
    else:  # the user shows a picture, the assistant describes it
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _phrase(rng, "dialogue_question", pool)}]},
                    {"role": "assistant", "content": [{"type": "text", "text": exact_caption(source).capitalize() + "."}]}]
    messages.append({"role": "user", "content": [{"type": "text", "text": edit}]})
    return messages, final, [scene]


def sample_context_example(seed: int, split: str, index: int, phrasing: str = "base") -> dict:
    """One example as plain Python: `kind`, `segments` (`("text", str)` / `("image", Scene)`, or
    for dialogues `messages`), `final` (the target object) and `scenes` (the input images).
    `phrasing` picks the training pool of `train` / `validation` ("base", "wide" or "composed", see
    `WIDE_PHRASES` and `COMPOSED_PHRASES`); `context_test` always uses the test phrasings."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; expected one of {PHRASINGS}")
    test = split == "context_test"
    pool = "test" if test else phrasing
    kinds = TEST_KINDS if test else TRAIN_KINDS
    kind = kinds[index % len(kinds)]
    rng = random.Random(f"context/{seed}/{split}/{index}")
    example = {"kind": kind, "segments": None, "messages": None, "scenes": []}
    if kind in STORY_KINDS + TEST_ONLY_KINDS:
        example["segments"], example["final"] = _story(rng, kind, pool)
    elif kind == "dialogue":
        example["messages"], example["final"], example["scenes"] = _dialogue(rng, pool)
    else:
        example["segments"], example["final"], example["scenes"] = _image_kind(rng, kind, pool)
    background = example["scenes"][0].background if example["scenes"] else rng.choice(BACKGROUND_NAMES)
    example["target_scene"] = Scene(background, (example["final"],))
    return example


def _png(scene: Scene) -> dict:
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def to_row(example: dict, chat_template_tokenizer=None) -> dict:
    """The example in the interleaved schema (dialogues rendered with `chat_template_tokenizer`'s
    chat template), plus its exact labels and the text-only baselines' prompts."""
    from ..interleaved import chat_segments, image_segment, interleaved_example, text_segment

    if example["messages"] is not None:
        if chat_template_tokenizer is None:
            raise ValueError("A dialogue example needs the LM's tokenizer to render its chat template.")
        segments = chat_segments(example["messages"], chat_template_tokenizer, [_png(scene) for scene in example["scenes"]])
        items = [item for message in example["messages"] for item in message["content"]]
        scenes = iter(example["scenes"])
        context_text = " ".join(item["text"] for item in items if item["type"] == "text")
        captioned = " ".join(item["text"] if item["type"] == "text" else exact_caption(next(scenes).objects[0]).capitalize() + "."
                             for item in items)
    else:
        segments = [text_segment(value) if kind == "text" else image_segment(_png(value)) for kind, value in example["segments"]]
        context_text = " ".join(value for kind, value in example["segments"] if kind == "text")
        captioned = " ".join(value if kind == "text" else exact_caption(value.objects[0]).capitalize() + "."
                             for kind, value in example["segments"])
    final = example["final"]
    row = interleaved_example(segments, exact_caption(final), _png(example["target_scene"]))
    row.update(kind=example["kind"], shape=final.shape, colour=final.colour, size=final.size, position=final.position,
               context_text=context_text, captioned_text=captioned)
    return row


def generate_context_dataset(n: int, split: str = "train", seed: int = 0, chat_template_tokenizer=None, start: int = 0,
                             phrasing: str = "base"):
    """`n` examples of a split as a `datasets.Dataset` (the interleaved schema + labels)."""
    import datasets

    from ..interleaved import interleaved_features

    features = interleaved_features()
    for name in ("kind", "shape", "colour", "size", "position", "context_text", "captioned_text"):
        features[name] = datasets.Value("string")
    rows = [to_row(sample_context_example(seed, split, start + i, phrasing), chat_template_tokenizer) for i in range(n)]
    return datasets.Dataset.from_list(rows, features=features)


__all__ = ["COMPOSED_PHRASES", "IMAGE_KINDS", "PHRASINGS", "SPLITS", "STORY_KINDS", "TEST_KINDS", "TEST_ONLY_KINDS", "TRAIN_KINDS", "exact_caption",
           "generate_context_dataset", "sample_context_example", "story_frames", "template_pattern", "to_row"]
