"""`gill-hf eval-world`: GILL-tiny judged on held-out world prompts, one table.

Rows (each on its own seeded stream, never a training stream):
- text -> image: single-object captions; GILL-tiny vs the world SD given the same caption;
- contextual generation (the paper's claim), on the world's `context_test` split (`world.context`,
  phrasings never seen in training): `stories` (the final scene depends on earlier sentences) and
  `image+text` (image edits, two-image combinations, dialogue follow-ups), each beside the world SD
  on the concatenated text, on the text with exact captions of the input images, and the oracle
  (`world.eval_context`);
- image -> text: colour and shape named in GILL-tiny's caption;
- retrieval: text -> image top-1 over the retrieval set (1,000 world images GILL-tiny never
  trained on) whose attributes all match the query's scene;
- decision: accuracy of the retrieve-or-generate heads on fresh labelled prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .eval_context import context_rows
from .scoring import caption_check, read_single_objects, score_readings

EVAL_SEED_BASE = 70_000
ROW_GROUPS = ("text-to-image", "stories", "image+text", "image-to-text", "retrieval", "decision")


def _batched_images(draw, items, args, seed: int) -> list:
    """`draw(batch, generators)` over `items` in batches, one seeded generator per item (a progress bar)."""
    import torch
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(items), args.batch_size), desc="eval-world batches", leave=False):
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

    groups = set(args.rows or ROW_GROUPS)
    if args.cases_output and not groups & {"stories", "image+text"}:
        raise ValueError("`--cases-output` writes the contextual cases: add `stories` or `image+text` to `--rows`.")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    pipe = load_gill_tiny_pipeline(args.model, args.sd)
    pipe.set_progress_bar_config(disable=True)  # one bar over the batches instead of two per call
    dataset = pipe.retrieval_index.dataset
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
        if groups & {"stories", "image+text"}:
            cases = [] if args.cases_output else None
            table.update(context_rows(pipe, sd, judge, args, seed + 6, groups, _gill_images, _sd_images, cases))
            if cases is not None:
                Path(args.cases_output).write_text("".join(json.dumps(case) + "\n" for case in cases))
            log("contextual generation (context_test)")
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
    lines = ["| row | shape | colour | size | position | edited | one object | all / accuracy | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        def cell(k):
            return f"{r[k]:.2f}" if k in r else ""
        last = r.get("all_four", r.get("accuracy", r.get("colour+shape")))
        lines.append(f"| {name} | {cell('shape')} | {cell('colour')} | {cell('size')} | {cell('position')} | {cell('new')} | "
                     f"{cell('one_object')} | {'' if last is None else f'{last:.2f}'} | {r.get('n', '')} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=50, help="Examples per row (contextual rows: per kind).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25, help="Diffusion steps (DDIM), both GILL-tiny and the world SD.")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--caption-tokens", type=int, default=16)
    parser.add_argument("--model", default=None, help="GILL-tiny folder (default: the shipped adapter).")
    parser.add_argument("--sd", default=None, help="World SD folder (default: the shipped one).")
    parser.add_argument("--hidden-head-model", default=None, help="A GILL-tiny folder holding the other decision head variant.")
    parser.add_argument("--output", default=None, help="Write the table as JSON here.")
    parser.add_argument("--cases-output", default=None,
                        help="Write every contextual case (stories, image+text) as JSON lines here: its prompt, the "
                             "truth and each drawer's judged reading.")
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
