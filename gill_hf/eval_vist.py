"""`gill-hf eval vist DIR`: the paper's VIST evaluation on VIST's published files.

DIR holds `sis/<split>.story-in-sequence.json` (or `<split>.story-in-sequence.json`) and
`images/<split>/<photo_flickr_id>.<jpg|png>`, as the VIST release does (`gill-hf world export-vist`
writes the world's stories in the same layout). Stories are read with `interleaved.vist_stories`;
a story with a missing photo is skipped and counted, as the release has holes.

Contextual generation (GILL's Table: CLIP ViT-L/14 image-image similarity to the real 5th image):
- `1 caption`: the 5th sentence alone;
- `5 captions`: the 5 sentences;
- `5 captions + 4 images`: the first 4 (image, sentence) pairs and the 5th sentence.
Each setting beside the decoder alone on the same text (the 5 concatenated sentences for the last
two). Retrieval: `5 captions + 4 images` -> the 5th image among every distinct image of the split's
stories (R@1/5/10, pool size printed).

    gill-hf eval vist data/vist --split test --clip openai/clip-vit-large-patch14 --output-dir out/vist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from .eval_common import EvalCase, add_common_arguments, readable_image, run_benchmark
from .interleaved import vist_image_path, vist_sentence, vist_stories

SETTINGS = ("1 caption", "5 captions", "5 captions + 4 images")


def sis_file(folder: Path, split: str) -> Path:
    for candidate in (folder / "sis" / f"{split}.story-in-sequence.json", folder / f"{split}.story-in-sequence.json"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{str(folder)!r} holds no {split}.story-in-sequence.json (in sis/ or at its root).")


def vist_cases(folder: str | Path, split: str = "test", num_stories: int | None = None,
               text_field: str = "original_text") -> tuple[list[EvalCase], dict[str, Path], Counter]:
    """The cases of every setting for the first `num_stories` complete stories, the retrieval pool
    (every distinct image of the split's complete stories) and the skip counts."""
    folder = Path(folder)
    image_dir = folder / "images" / split
    stories = vist_stories(sis_file(folder, split))
    skipped, complete = Counter(), []
    for story_id, storylets in sorted(stories.items()):
        paths = [vist_image_path(image_dir, str(s["photo_flickr_id"])) for s in storylets]
        if len(storylets) != 5:
            skipped["incomplete_story"] += 1
        elif any(p is None for p in paths):
            skipped["missing_image"] += 1
        elif not all(readable_image(p) for p in paths):
            skipped["unreadable_image"] += 1
        else:
            complete.append((story_id, storylets, paths))
    if not complete:
        raise ValueError(f"{str(folder)!r} has no complete story with its 5 images (skipped {dict(skipped)}).")
    pool = {str(s["photo_flickr_id"]): p for _, storylets, paths in complete for s, p in zip(storylets, paths)}
    cases = []
    for story_id, storylets, paths in complete[:num_stories]:
        sentences = [vist_sentence(s, text_field) for s in storylets]
        target_key = str(storylets[4]["photo_flickr_id"])
        target = pool[target_key]
        context = [item for i in range(4) for item in (pool[str(storylets[i]["photo_flickr_id"])], sentences[i])]
        cases += [
            EvalCase(f"{story_id}", "1 caption", [sentences[4]], sentences[4], target, target_key),
            EvalCase(f"{story_id}", "5 captions", sentences, " ".join(sentences), target, target_key),
            EvalCase(f"{story_id}", "5 captions + 4 images", context + [sentences[4]], " ".join(sentences), target, target_key),
        ]
    return cases, pool, skipped


def run_vist(args: argparse.Namespace) -> list[dict]:
    cases, pool, skipped = vist_cases(args.data_dir, args.split, args.num_stories)
    return run_benchmark(args, "vist", cases, pool, skipped, ["5 captions + 4 images"], "stories", len(SETTINGS))


def register(subparsers) -> None:
    parser = subparsers.add_parser("vist", help="VIST: contextual generation (1 / 5 captions / 5 captions + 4 images) and retrieval.")
    parser.add_argument("data_dir", help="VIST folder: sis/<split>.story-in-sequence.json + images/<split>/.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-stories", type=int, default=None, help="The first N complete stories (default: all).")
    add_common_arguments(parser)
    parser.set_defaults(func=run_vist)


__all__ = ["SETTINGS", "register", "run_vist", "vist_cases"]
