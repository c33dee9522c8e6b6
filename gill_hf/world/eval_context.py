"""eval-world's contextual rows: GILL-tiny on the world's `context_test` split (phrasings never seen in
training; `world.context`), judged by the world judge, beside three references that use the world SD:

- the **text baseline**: the world SD on the context's text, concatenated (what a text-to-image model
  given the same text can do);
- for image kinds, the **captioned baseline**: the same text with each input image replaced by its
  exact caption (the best any text-only pipeline could do);
- the **oracle**: the world SD given the exact caption of the target scene (the decoder's ceiling).

Rows: stories (the story kinds pooled, equal numbers, then each kind), the kind that appears only in
`context_test` (its own row), image edits (each edit kind, with the accuracy of the edited
attribute), two-image combinations, dialogue follow-ups, and the share of single-object final
scenes that GILL-tiny draws as one object.
"""

from __future__ import annotations

import io

import PIL.Image

from .context import IMAGE_KINDS, STORY_KINDS, TEST_KINDS, TEST_ONLY_KINDS, sample_context_example, to_row
from .scoring import read_single_objects, score_readings

EDITED = {"edit-colour": "colour", "edit-shape": "shape", "edit-size": "size", "edit-position": "position"}
STORY_GROUP = STORY_KINDS + TEST_ONLY_KINDS
IMAGE_GROUP = IMAGE_KINDS


def context_cases(kinds: tuple[str, ...], per_kind: int, seed: int, tokenizer) -> dict[str, list[dict]]:
    """`per_kind` rows of `context_test` for each of `kinds` (kinds cycle by index in the split)."""
    cases: dict[str, list[dict]] = {kind: [] for kind in kinds}
    index = 0
    while any(len(rows) < per_kind for rows in cases.values()):
        kind = TEST_KINDS[index % len(TEST_KINDS)]
        if kind in cases and len(cases[kind]) < per_kind:
            cases[kind].append(to_row(sample_context_example(seed, "context_test", index), tokenizer))
        index += 1
    return cases


def context_prompt(row: dict) -> list:
    """A context row's segments as a pipeline prompt (strings and PIL images)."""
    prompt = []
    for segment in row["segments"]:
        if segment["type"] == "text":
            prompt.append(segment["text"])
        else:
            prompt.append(PIL.Image.open(io.BytesIO(segment["image"]["bytes"])).convert("RGB"))
    return prompt


def _truth(row: dict) -> dict:
    return {attr: row[attr] for attr in ("shape", "colour", "size", "position")}


def _prompt_text(row: dict) -> str:
    return " ".join(s["text"] if s["type"] == "text" else "<image>" for s in row["segments"])


def context_rows(pipe, sd, judge, args, seed: int, groups: set[str], gill_images, sd_images, cases_out: list | None = None) -> dict:
    """The table rows of the `stories` and `image+text` groups (see the module docstring).
    `gill_images(pipe, prompts, args, seed)` and `sd_images(sd, texts, args, seed)` draw images.
    `cases_out`, when given, receives one dict per case and drawer: kind, index, drawer, prompt
    (images as `<image>`), the text the drawer was given (references), truth and the judge's reading."""
    kinds = (STORY_GROUP if "stories" in groups else ()) + (IMAGE_GROUP if "image+text" in groups else ())
    cases = context_cases(kinds, args.num, seed, pipe.processor.tokenizer)
    table: dict[str, dict] = {}
    single_object = []
    readings: dict[str, dict[str, list]] = {}
    for k, kind in enumerate(kinds):
        rows = cases[kind]
        truths = [_truth(r) for r in rows]
        gill = read_single_objects(judge, gill_images(pipe, [context_prompt(r) for r in rows], args, seed + 100 * k))
        single_object += gill
        references = {"world SD (concatenated text)": [r["context_text"] for r in rows],
                      "oracle (world SD, exact target caption)": [r["target_caption"] for r in rows]}
        if kind in IMAGE_GROUP:
            references["world SD (text + exact captions of the input images)"] = [r["captioned_text"] for r in rows]
        readings[kind] = {"GILL-tiny": gill, "truths": truths}
        for name, texts in references.items():
            readings[kind][name] = read_single_objects(judge, sd_images(sd, texts, args, seed + 100 * k))
        if cases_out is not None:
            for name in ("GILL-tiny", *references):  # a fixed order: the lines are the same on every run
                cases_out += [{"kind": kind, "index": i, "drawer": name, "prompt": _prompt_text(row),
                               "text": references[name][i] if name in references else None, "truth": truth, "reading": reading}
                              for i, (row, truth, reading) in enumerate(zip(rows, truths, readings[kind][name]))]
    if "stories" in groups:
        pooled = [kind for kind in STORY_KINDS]
        for name in ("GILL-tiny", "world SD (concatenated text)", "oracle (world SD, exact target caption)"):
            table[f"stories {name}"] = score_readings(sum((readings[k][name] for k in pooled), []),
                                                      sum((readings[k]["truths"] for k in pooled), []))
        for kind in STORY_GROUP:
            label = f"{kind} (context_test only)" if kind in TEST_ONLY_KINDS else kind
            for name in ("GILL-tiny", "world SD (concatenated text)"):
                table[f"stories/{label} {name}"] = score_readings(readings[kind][name], readings[kind]["truths"])
    if "image+text" in groups:
        for kind in IMAGE_GROUP:
            for name, values in readings[kind].items():
                if name == "truths":
                    continue
                row = score_readings(values, readings[kind]["truths"])
                if kind in EDITED:
                    attribute = EDITED[kind]
                    row["new"] = row[attribute]
                table[f"{kind} {name}"] = row
    if single_object:
        table["single-object final scenes drawn as one object GILL-tiny"] = {
            "accuracy": sum(r["count"] == 1 for r in single_object) / len(single_object), "n": len(single_object)}
    return table


__all__ = ["EDITED", "IMAGE_GROUP", "STORY_GROUP", "context_cases", "context_prompt", "context_rows"]
