"""`gill-hf eval-world`: GILL-tiny judged on held-out world prompts, one table.

Rows (each on its own seeded stream, never a training stream):
- text -> image: single-object captions; GILL-tiny vs the world SD given the same caption;
- contextual generation (the paper's claim): multi-sentence stories whose final scene depends on
  earlier sentences (a colour / size / position change of "it", "the same shape" references, a
  distractor to forget), GILL-tiny vs the world SD given the same concatenated text; and
  interleaved image + text contexts ("[image] The same shape, but <colour>."), where the world SD
  only gets the text;
- image -> text: colour and shape named in GILL-tiny's caption;
- retrieval: text -> image top-1 over the retrieval set (1,000 world images GILL-tiny never
  trained on) whose attributes all match the query's scene;
- decision: accuracy of the retrieve-or-generate heads on fresh labelled prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from .render import COLOUR_NAMES, POSITION_PHRASES, POSITIONS, SHAPES, SIZE_WORDS, SIZES
from .scoring import caption_check, read_single_objects, score_readings

EVAL_SEED_BASE = 70_000
ROW_GROUPS = ("text-to-image", "stories", "image+text", "image-to-text", "retrieval", "decision")


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _np(rng, shape, colour, size) -> str:
    phrase = f"{rng.choice(SIZE_WORDS[size])} {colour} {shape}"
    return f"{_article(phrase)} {phrase}"


def make_stories(n: int, seed: int = 0) -> list[tuple[str, dict, str]]:
    """n (story, final single-object attributes, kind), kinds cycling through colour / size /
    position changes, a same-shape reference and a distractor."""
    rng = random.Random(f"stories/{seed}")
    kinds = ("colour", "size", "position", "same-shape", "distractor")
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        shape, colour, size, pos = rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.choice(SIZES), rng.choice(POSITIONS)
        first = f"{_np(rng, shape, colour, size).capitalize()} sits {rng.choice(POSITION_PHRASES[pos])}."
        final = {"shape": shape, "colour": colour, "size": size, "position": pos}
        if kind == "colour":
            new = rng.choice([c for c in COLOUR_NAMES if c != colour])
            text, final["colour"] = f"{first} Then it turns {new}.", new
        elif kind == "size":
            new = "large" if size == "small" else "small"
            text, final["size"] = f"{first} Then it becomes {rng.choice(SIZE_WORDS[new])}.", new
        elif kind == "position":
            new = rng.choice([p for p in POSITIONS if p != pos])
            text, final["position"] = f"{first} Then it moves {rng.choice(POSITION_PHRASES[new])}.", new
        elif kind == "same-shape":
            new_colour, new_pos = rng.choice([c for c in COLOUR_NAMES if c != colour]), rng.choice(POSITIONS)
            text = f"{first} Now picture the same shape, {new_colour}, {rng.choice(POSITION_PHRASES[new_pos])}."
            final.update(colour=new_colour, position=new_pos)
        else:
            d_shape = rng.choice([s for s in SHAPES if s != shape])
            d_colour = rng.choice([c for c in COLOUR_NAMES if c != colour])
            text = f"Forget {_np(rng, d_shape, d_colour, rng.choice(SIZES))}. {first}"
        out.append((text, final, kind))
    return out


def _batched_images(draw, items, args, seed: int) -> list:
    """`draw(batch, generators)` over `items` in batches, one seeded generator per item."""
    import torch

    out = []
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        out += draw(batch, [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))])
    return out


def _gill_images(pipe, prompts, args, seed: int) -> list:
    def draw(batch, gens):
        result = pipe(prompt=batch, force_image=True, image_source="generated", max_new_tokens=8, max_images=1,
                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=gens, output_type="pil")
        return [row[0] for row in result.images]

    return _batched_images(draw, prompts, args, seed)


def _sd_images(sd, texts, args, seed: int) -> list:
    def draw(batch, gens):
        return sd(batch, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=gens).images

    return _batched_images(draw, texts, args, seed)


def evaluate_world(args) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from .gill_tiny import load_gill_tiny_pipeline
    from .judge import load_judge

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    pipe = load_gill_tiny_pipeline(args.model, args.sd)
    dataset = pipe.retrieval_index.dataset
    groups = set(args.rows or ROW_GROUPS)
    sd = judge = None
    if groups & {"text-to-image", "stories", "image+text"}:  # the rows that draw images to judge
        sd = StableDiffusionPipeline.from_pretrained(str(args.sd or Path(__file__).parent / "assets" / "sd"), dtype=torch.float32,
                                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        sd.set_progress_bar_config(disable=True)
        judge = load_judge()
    # Every group seeds its own samplers from this base (fixed offsets), so `--rows` changes no group's draws.
    seed = EVAL_SEED_BASE + args.seed
    table: dict[str, dict] = {}

    def log(msg):
        print(f"[eval-world | {time.time() - start:6.1f} s] {msg}", flush=True)

    with torch.no_grad():
        if "text-to-image" in groups:
            table.update(_text_to_image_rows(pipe, sd, judge, args, seed))
            log("text -> image")
        if "stories" in groups:
            table.update(_story_rows(pipe, sd, judge, args, seed))
            log("stories")
        if "image+text" in groups:
            table.update(_interleaved_rows(pipe, sd, judge, args, seed))
            log("image + text -> image")
        if "image-to-text" in groups:
            table["image->text GILL-tiny"] = _caption_row(pipe, args, seed)
            log("image -> text")
        model, processor = pipe.gill_model, pipe.processor
        if "retrieval" in groups:
            table["retrieval top-1 all attributes match"] = _retrieval_row(model, processor, pipe.retrieval_index, dataset,
                                                                           seed + 4, args.num)
            log("retrieval")
        if "decision" in groups:
            table.update(_decision_rows(args, model, processor, pipe.retrieval_index, dataset, seed + 5, args.num))
            log("decision")
    meta = {"seed": args.seed, "n": args.num, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "rows": sorted(groups), "wall_s": round(time.time() - start, 1)}
    result = {"meta": meta, "table": table}
    print(format_table(table))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


def _text_to_image_rows(pipe, sd, judge, args, seed: int) -> dict:
    """Single-object captions, validation (seen shape/colour pairs) and heldout (unseen pairs)."""
    from .data import sample_example

    table = {}
    for split in ("validation", "heldout"):
        scenes = [sample_example(seed, split, i, num_objects=1) for i in range(args.num)]
        captions = [c for _, c in scenes]
        truths = [{k: s.labels()[k + "s"][0] for k in ("shape", "colour", "size", "position")} for s, _ in scenes]
        table[f"text->image ({split}) GILL-tiny"] = score_readings(read_single_objects(judge, _gill_images(pipe, captions, args, seed)), truths)
        table[f"text->image ({split}) world SD"] = score_readings(read_single_objects(judge, _sd_images(sd, captions, args, seed)), truths)
    return table


def _story_rows(pipe, sd, judge, args, seed: int) -> dict:
    stories = make_stories(args.num, seed)
    texts, truths = [s for s, _, _ in stories], [f for _, f, _ in stories]
    gill = read_single_objects(judge, _gill_images(pipe, texts, args, seed + 1))
    base = read_single_objects(judge, _sd_images(sd, texts, args, seed + 1))
    table = {"stories GILL-tiny": score_readings(gill, truths), "stories world SD (concatenated text)": score_readings(base, truths)}
    for kind in ("colour", "size", "position", "same-shape", "distractor"):
        idx = [i for i, (_, _, k) in enumerate(stories) if k == kind]
        table[f"stories/{kind} GILL-tiny"] = score_readings([gill[i] for i in idx], [truths[i] for i in idx])
        table[f"stories/{kind} world SD"] = score_readings([base[i] for i in idx], [truths[i] for i in idx])
    return table


def _interleaved_rows(pipe, sd, judge, args, seed: int) -> dict:
    """[image] "The same shape, but <colour>." -> image; the world SD only gets the text."""
    from .data import sample_example
    from .render import render_scene

    rng = random.Random(f"interleaved/{seed}")
    prompts, sd_texts, truths = [], [], []
    for i in range(args.num):
        scene, _ = sample_example(seed + 2, "validation", i, num_objects=1)
        labels = scene.labels()
        colour = rng.choice([c for c in COLOUR_NAMES if c != labels["colours"][0]])
        text = f"The same shape, but {colour}."
        prompts.append([render_scene(scene), text])
        sd_texts.append(text)
        truths.append({"shape": labels["shapes"][0], "colour": colour, "size": labels["sizes"][0], "position": labels["positions"][0]})
    return {"image+text GILL-tiny": score_readings(read_single_objects(judge, _gill_images(pipe, prompts, args, seed + 2)), truths),
            "image+text world SD (text only)": score_readings(read_single_objects(judge, _sd_images(sd, sd_texts, args, seed + 2)), truths)}


def _caption_row(pipe, args, seed: int) -> dict:
    """Colour and shape words of GILL-tiny's caption of a single-object image."""
    import torch

    from .data import sample_example
    from .render import render_scene

    hits = []
    for i in range(args.num):
        scene, _ = sample_example(seed + 3, "validation", i, num_objects=1)
        out = pipe(prompt=[render_scene(scene)], max_new_tokens=args.caption_tokens, max_images=1, image_source="generated",
                   num_inference_steps=1, generator=torch.Generator().manual_seed(seed + i))
        labels = scene.labels()
        hits.append(caption_check(out.text[0], {"colour": labels["colours"][0], "shape": labels["shapes"][0]}))
    return {"colour": float(np.mean([h["colour"] for h in hits])), "shape": float(np.mean([h["shape"] for h in hits])),
            "colour+shape": float(np.mean([h["colour"] and h["shape"] for h in hits])), "n": args.num}


def _retrieval_row(model, processor, index, dataset, seed: int, n: int) -> dict:
    """Top-1 of queries that re-phrase scenes of the retrieval set: does its scene match exactly?"""
    from .gill_tiny import decision_prompts, scene_key

    queries = [p for p in decision_prompts(2 * n, seed=seed, index_dataset=dataset) if p[1] == "retrieve"]
    keys = [scene_key(row) for row in dataset.select_columns(["shapes", "colours", "sizes", "positions"])]
    rows = processor.build_training_inputs([q for q, _, _ in queries], max_length=48)
    text = model.get_text_retrieval_embeds(model(input_ids=rows["input_ids"]).img_hidden_states).float()
    top_idx = index.search(text, k=1)[1][:, 0]
    match = [keys[int(j)] == scene_key(labels) for j, (_, _, labels) in zip(top_idx, queries)]
    return {"accuracy": float(np.mean(match)), "n": len(match)}


def _decision_rows(args, model, processor, index, dataset, seed: int, n: int) -> dict:
    import torch

    from ..decision import decision_features
    from .gill_tiny import decision_prompts, load_gill_tiny

    prompts = decision_prompts(2 * n, seed=seed, index_dataset=dataset)
    labels = torch.tensor([1 if d == "retrieve" else 0 for _, d, _ in prompts])
    rows = {}
    candidates = [("shipped", model, processor)]
    if args.hidden_head_model:
        other, other_processor = load_gill_tiny(args.hidden_head_model)
        candidates.append(("extra", other, other_processor))
    for _, m, p in candidates:
        head_type = m.config.decision_head_type
        if head_type is None:
            continue
        features = decision_features(m, p, [t for t, _, _ in prompts], head_type, index.embeddings.float())
        m.decision_head.eval()
        predicted = m.decision_head(features.to(next(m.decision_head.parameters()).dtype)).argmax(-1)
        rows[f"decision accuracy ({head_type}, {features.shape[1]} inputs)"] = {
            "accuracy": float((predicted == labels).float().mean()), "n": len(prompts)}
    return rows


def format_table(table: dict) -> str:
    lines = ["| row | shape | colour | size | position | all / accuracy | n |", "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        def cell(k):
            return f"{r[k]:.2f}" if k in r else ""
        last = r.get("all_four", r.get("accuracy", r.get("colour+shape")))
        lines.append(f"| {name} | {cell('shape')} | {cell('colour')} | {cell('size')} | {cell('position')} | "
                     f"{'' if last is None else f'{last:.2f}'} | {r.get('n', '')} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=50, help="Examples per row.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25, help="Diffusion steps (DDIM), both GILL-tiny and the world SD.")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--caption-tokens", type=int, default=16)
    parser.add_argument("--model", default=None, help="GILL-tiny folder (default: the shipped adapter).")
    parser.add_argument("--sd", default=None, help="World SD folder (default: the shipped one).")
    parser.add_argument("--hidden-head-model", default=None, help="A GILL-tiny folder holding the other decision head variant.")
    parser.add_argument("--output", default=None, help="Write the table as JSON here.")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rows", nargs="+", choices=ROW_GROUPS, default=None,
                        help="Row groups to run (default: all), e.g. `--rows retrieval decision --num 200`.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval-world", help="GILL-tiny vs the world SD, judged on held-out world prompts (one table).")
    add_arguments(parser)
    parser.set_defaults(func=evaluate_world)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gill_hf.world.eval_gill")
    add_arguments(parser)
    evaluate_world(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
