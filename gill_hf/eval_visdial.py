"""`gill-hf eval visdial DIR`: the paper's VisDial evaluation on VisDial v1.0's published files.

DIR holds `visdial_1.0_<split>.json` (`data.questions`, `data.answers`, `data.dialogs[]` with
`image_id`, `caption`, `dialog[]` rounds of `question` / `answer` indices) and the split's images
(`VisualDialog_val2018_<12-digit id>.jpg` for val, COCO `COCO_train2014_<id>.jpg` /
`COCO_val2014_<id>.jpg` for train; found under DIR or `--image-dir`). A dialog whose image is missing is
skipped and counted; an answer index out of range is an error naming the file and dialog.

Settings (GILL's): the caption and the first 1 / 5 / 10 rounds as text context, each round as
`Q: <question>? A: <answer>.`, -> generate the image (CLIP similarity to the real one, beside the
decoder alone on the same text) and retrieve it among every image of the split (R@1/5/10).

    gill-hf eval visdial data/visdial --split val --clip openai/clip-vit-large-patch14 --output-dir out/visdial
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from .eval_common import EvalCase, add_common_arguments, readable_image, run_benchmark

ROUNDS = (1, 5, 10)
IMAGE_PATTERNS = ("VisualDialog_{split}2018_{id:012d}.jpg", "VisualDialog_val2018_{id:012d}.jpg", "COCO_train2014_{id:012d}.jpg",
                  "COCO_val2014_{id:012d}.jpg", "{id}.jpg", "{id}.png")


def read_visdial(path: str | Path) -> list[dict]:
    """The dialogs of a VisDial v1.0 json as `{"image_id", "caption", "rounds": [(question, answer)]}`
    (a round without an answer, as in test's last round, ends the list)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        questions, answers, dialogs = data["questions"], data["answers"], data["dialogs"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{str(path)!r} is not a VisDial v1.0 file (truncated, or no data.questions/answers/dialogs): {error!r}") from error
    out = []
    for index, dialog in enumerate(dialogs):
        rounds = []
        for turn in dialog.get("dialog", []):
            if "answer" not in turn:
                break
            q, a = turn.get("question"), turn.get("answer")
            if not (isinstance(q, int) and 0 <= q < len(questions) and isinstance(a, int) and 0 <= a < len(answers)):
                raise ValueError(f"{str(path)!r} dialog {index} (image {dialog.get('image_id')}): question/answer index out of range.")
            rounds.append((questions[q], answers[a]))
        out.append({"image_id": dialog["image_id"], "caption": dialog.get("caption", ""), "rounds": rounds})
    return out


def find_image(image_dir: Path, image_id: int, split: str) -> Path | None:
    for pattern in IMAGE_PATTERNS:
        path = image_dir / pattern.format(split=split, id=int(image_id))
        if path.is_file():
            return path
    return None


def dialog_text(caption: str, rounds: list[tuple[str, str]]) -> str:
    turns = " ".join(f"Q: {q.rstrip(' ?')}? A: {a.rstrip(' .')}." for q, a in rounds)
    return f"{caption.rstrip(' .')}. {turns}".strip()


def visdial_cases(folder: str | Path, split: str = "val", image_dir: str | Path | None = None,
                  num_dialogs: int | None = None) -> tuple[list[EvalCase], dict[str, Path], Counter]:
    folder = Path(folder)
    dialogs = read_visdial(folder / f"visdial_1.0_{split}.json")
    image_dir = Path(image_dir) if image_dir else folder
    skipped, found = Counter(), []
    for dialog in dialogs:
        path = find_image(image_dir, dialog["image_id"], split)
        if path is None:
            skipped["missing_image"] += 1
        elif not readable_image(path):
            skipped["unreadable_image"] += 1
        else:
            found.append((dialog, path))
    if not found:
        raise ValueError(f"No image of {split!r} found under {str(image_dir)!r} (skipped {dict(skipped)}).")
    pool = {str(dialog["image_id"]): path for dialog, path in found}
    cases = []
    for dialog, _ in found[:num_dialogs]:
        key = str(dialog["image_id"])
        for n in ROUNDS:
            text = dialog_text(dialog["caption"], dialog["rounds"][:n])
            cases.append(EvalCase(key, f"caption + {n} round{'s' if n > 1 else ''}", [text], text, pool[key], key))
    return cases, pool, skipped


def run_visdial(args: argparse.Namespace) -> list[dict]:
    cases, pool, skipped = visdial_cases(args.data_dir, args.split, args.image_dir, args.num_dialogs)
    return run_benchmark(args, "visdial", cases, pool, skipped, sorted({c.setting for c in cases}), "dialogs", len(ROUNDS))


def register(subparsers) -> None:
    parser = subparsers.add_parser("visdial", help="VisDial v1.0: generation and retrieval from the caption + 1 / 5 / 10 rounds.")
    parser.add_argument("data_dir", help="Folder of visdial_1.0_<split>.json (and the images, unless --image-dir).")
    parser.add_argument("--split", default="val")
    parser.add_argument("--image-dir", default=None, help="Folder of the split's images (default: data_dir).")
    parser.add_argument("--num-dialogs", type=int, default=None, help="The first N dialogs with an image (default: all).")
    add_common_arguments(parser)
    parser.set_defaults(func=run_visdial)


__all__ = ["read_visdial", "register", "run_visdial", "visdial_cases"]
