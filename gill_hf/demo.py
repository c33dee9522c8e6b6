"""`gill-hf demo`: GILL-tiny on the embedded world, every capability on fresh seeded examples.

    gill-hf demo --output-dir demo_out [--seed 0] [--steps 25] [--model PATH] [--sd PATH]

Runs through `GillPipeline` (GILL-tiny adapter + world SD + a retrieval index over world images
GILL-tiny never trained on):

1. text -> generated image (captions of fresh scenes; each image read by the world judge);
2. image -> caption (the caption's colour and shape words checked against the scene);
3. image + text -> image ("the same shape, but green"; judged: shape kept, colour green);
4. a multi-turn dialogue, formatted with the instruct LM's own chat template (ChatML): SmolLM2-135M-
   Instruct was tuned on it, so its text turns stay in distribution; the reference's `Q: ... A:`
   suited OPT, a base LM. GILL's heads only read the `[IMG]` states, whatever the template;
5. one prompt whose scene is in the retrieval set and one whose scene is not, answered with
   `image_source="auto"`: the decision head's probabilities and its choice.

Writes `report.html` (images inline as base64 PNG), `grid.png` and `summary.json` to the output
folder and prints a short summary. Every example comes from a seed of its own (never a training
stream), so a rerun with the same `--seed` reproduces the report.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .world.scoring import caption_check, describe, first_sentence, read_single_objects, scene_attributes

SECTIONS = (
    ("text-to-image", "Text -> generated image"),
    ("image-to-text", "Image -> caption"),
    ("image-and-text-to-image", "Image + text -> image (\"the same shape, but green\")"),
    ("dialogue", "Multi-turn dialogue (chat template)"),
    ("retrieve-or-generate", "Retrieve or generate (decision head)"),
)
DEMO_SEED_BASE = 50_000  # the demo's own sample streams: seed + this, never a training stream
UPSCALE = 4


@dataclass
class Item:
    """One example of a section: what was asked, what came back, and how it was judged."""

    prompt: str
    images_in: list = field(default_factory=list)
    text_out: str = ""
    images_out: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)


# ----- helpers -------------------------------------------------------------------------------------------


def _png_b64(image, scale: int = UPSCALE) -> str:
    import PIL.Image

    image = image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _generators(seed: int, n: int):
    import torch

    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


class _Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[demo {self.done}/{self.total} | {time.time() - self.start:5.1f} s] {what}", flush=True)


# ----- the sections ----------------------------------------------------------------------------------------


def _gen_kwargs(args) -> dict:
    return {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "output_type": "pil"}


def text_to_image(pipe, judge, args) -> list[Item]:
    from .world.data import sample_example

    scenes = [sample_example(DEMO_SEED_BASE + args.seed, "validation", i, num_objects=1) for i in range(args.num_examples)]
    captions = [caption for _, caption in scenes]
    out = pipe(prompt=captions, force_image=True, image_source="generated", max_new_tokens=8,
               generator=_generators(args.seed, len(captions)), **_gen_kwargs(args))
    images = [row[0] for row in out.images]
    readings = read_single_objects(judge, images)
    items = []
    for (scene, caption), image, seen in zip(scenes, images, readings):
        truth = scene_attributes(scene.labels())
        checks = {k: seen[k] == truth[k] for k in ("shape", "colour", "size", "position")}
        items.append(Item(prompt=caption, images_out=[image], checks=checks,
                          notes=[f"asked: {describe(truth)}", f"judge sees: {describe(seen)}"]))
    return items


def image_to_text(pipe, judge, args) -> list[Item]:
    from .world.data import sample_example
    from .world.render import render_scene

    items = []
    for i in range(args.num_examples):
        scene, _ = sample_example(DEMO_SEED_BASE + 1000 + args.seed, "validation", i, num_objects=1)
        image = render_scene(scene)
        out = pipe(prompt=[image], max_new_tokens=args.caption_tokens, image_source="generated", max_images=1,
                   generator=_generators(args.seed + 100 + i, 1), **_gen_kwargs(args))
        text = first_sentence(out.text[0].replace("<image>", "").strip())  # the captioning protocol's answer
        truth = scene_attributes(scene.labels())
        items.append(Item(prompt="[image]", images_in=[image], text_out=text, checks=caption_check(text, truth),
                          notes=[f"scene: {describe(truth)}"]))
    return items


def image_and_text_to_image(pipe, judge, args) -> list[Item]:
    from .world.data import sample_example
    from .world.render import render_scene

    instruction = "The same shape, but green."
    items = []
    for i in range(args.num_examples):
        j = 0
        while True:  # a source object that is not green already
            scene, _ = sample_example(DEMO_SEED_BASE + 2000 + args.seed, "validation", i * 100 + j, num_objects=1)
            j += 1
            if scene.labels()["colours"][0] != "green":
                break
        image = render_scene(scene)
        out = pipe(prompt=[image, instruction], force_image=True, image_source="generated", max_new_tokens=8,
                   generator=_generators(args.seed + 200 + i, 1), **_gen_kwargs(args))
        generated = out.images[0][0]
        seen = read_single_objects(judge, [generated])[0]
        source = scene_attributes(scene.labels())
        items.append(Item(prompt=f"[image] {instruction}", images_in=[image], images_out=[generated],
                          checks={"shape kept": seen["shape"] == source["shape"], "green": seen["colour"] == "green"},
                          notes=[f"source: {describe(source)}", f"judge sees: {describe(seen)}"]))
    return items


def dialogue(pipe, judge, args) -> list[Item]:
    """Two user turns in the LM's chat template: describe an image, then draw a variation of it."""
    from .world.data import sample_example
    from .world.render import render_scene

    tokenizer = pipe.processor.tokenizer
    scene, _ = sample_example(DEMO_SEED_BASE + 3000 + args.seed, "validation", 0, num_objects=1)
    image = render_scene(scene)
    messages = [{"role": "user", "content": "<image> What is in this picture?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    first = pipe(prompt=prompt, prompt_images=[image], max_new_tokens=args.caption_tokens, image_source="generated",
                 max_images=1, generator=_generators(args.seed + 300, 1), **_gen_kwargs(args))
    answer = first_sentence(first.text[0].replace("<image>", "").strip())
    truth = scene_attributes(scene.labels())
    items = [Item(prompt="user: [image] What is in this picture?", images_in=[image], text_out=f"assistant: {answer}",
                  checks=caption_check(answer, truth), notes=[f"scene: {describe(truth)}"])]
    follow = "Now show me a picture of it, but large and in the center."
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    second = pipe(prompt=prompt, prompt_images=[image], force_image=True, image_source="generated",
                  max_new_tokens=8 + args.caption_tokens, max_images=1, generator=_generators(args.seed + 301, 1),
                  **_gen_kwargs(args))
    generated = [row for row in second.images[0]]
    seen = read_single_objects(judge, generated[:1])[0] if generated else None
    checks = {} if seen is None else {"shape kept": seen["shape"] == truth["shape"], "colour kept": seen["colour"] == truth["colour"]}
    items.append(Item(prompt=f"user: {follow}", text_out="assistant: " + second.text[0], images_out=generated, checks=checks,
                      notes=[f"judge sees: {describe(seen)}"] if seen else []))
    return items


def retrieve_or_generate(pipe, judge, args, dataset) -> list[Item]:
    from .world.gill_tiny import decision_prompts

    # The first "retrieve" and the first "generate" prompt of the demo's own decision stream.
    prompts = decision_prompts(2, seed=DEMO_SEED_BASE + args.seed, index_dataset=dataset)
    has_head = pipe.gill_model.config.decision_head_type is not None
    source = "auto" if has_head else "generated"
    items = []
    for i, (text, truth, labels) in enumerate(prompts):
        out = pipe(prompt=text, force_image=True, image_source=source, max_new_tokens=8, num_retrieved=3,
                   generator=_generators(args.seed + 400 + i, 1), **_gen_kwargs(args))
        notes = [f"ground truth: {truth} (the scene is {'in' if truth == 'retrieve' else 'not in'} the retrieval set)"]
        checks = {}
        if out.decision_probs is not None and out.decision_probs[0] is not None and len(out.decision_probs[0]):
            probs = out.decision_probs[0][0].tolist()
            chosen = out.image_sources[0][0]
            notes.append(f"decision probabilities: generate {probs[0]:.3f}, retrieve {probs[1]:.3f} -> {chosen}")
            checks["decision"] = (chosen == "retrieved") == (truth == "retrieve")
        else:
            notes.append("no decision head in this checkpoint: generated")
        if out.retrieval_scores is not None and out.retrieval_scores[0] is not None:
            top = out.retrieval_scores[0][0].tolist()
            notes.append("top retrieval cosine: " + ", ".join(f"{s:.3f}" for s in top))
        items.append(Item(prompt=text, images_out=list(out.images[0]), notes=notes, checks=checks,
                          text_out=f"image source: {', '.join(out.image_sources[0])}"))
    return items


# ----- report ----------------------------------------------------------------------------------------------


def write_report(results: dict[str, list[Item]], output_dir: Path, meta: dict) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>GILL-tiny demo</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{image-rendering:pixelated;"
             "border:1px solid #ccc;margin:2px}.ok{color:#080}.bad{color:#b00}td{vertical-align:top;padding:4px}</style>",
             "</head><body><h1>GILL-tiny demo</h1>",
             f"<p>{html.escape(json.dumps(meta))}</p>"]
    summary = {}
    for key, title in SECTIONS:
        items = results.get(key, [])
        parts.append(f"<section id='{key}'><h2>{html.escape(title)}</h2><table>")
        counts: dict[str, list[int]] = {}
        for item in items:
            ins = "".join(f"<img src='data:image/png;base64,{_png_b64(im)}'>" for im in item.images_in)
            outs = "".join(f"<img src='data:image/png;base64,{_png_b64(im)}'>" for im in item.images_out)
            checks = " ".join(f"<span class='{'ok' if v else 'bad'}'>{html.escape(k)}: {'yes' if v else 'no'}</span>"
                              for k, v in item.checks.items())
            for k, v in item.checks.items():
                counts.setdefault(k, []).append(int(v))
            notes = "<br>".join(html.escape(n) for n in item.notes)
            parts.append(f"<tr><td>{ins}</td><td><b>{html.escape(item.prompt)}</b><br>{html.escape(item.text_out)}"
                         f"<br>{notes}<br>{checks}</td><td>{outs}</td></tr>")
        parts.append("</table></section>")
        summary[key] = {k: f"{sum(v)}/{len(v)}" for k, v in counts.items()}
        summary[key]["examples"] = len(items)
    parts.append(f"<section id='summary'><h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=1))}</pre></section>")
    parts.append("</body></html>")
    (output_dir / "report.html").write_text("\n".join(parts), encoding="utf-8")
    _write_grid(results, output_dir / "grid.png")
    (output_dir / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    return summary


def _write_grid(results: dict[str, list[Item]], path: Path) -> None:
    """One row per section: each example's input images, then its output images (x4, pixelated)."""
    import PIL.Image
    import PIL.ImageDraw

    tile, label_h, pad = 32 * UPSCALE, 14, 6
    rows = []
    for key, _ in SECTIONS:
        tiles = []
        for item in results.get(key, []):
            tiles += [("in", im) for im in item.images_in] + [("out", im) for im in item.images_out]
        rows.append((key, tiles))
    width = max(1, max(len(t) for _, t in rows)) * (tile + pad) + pad
    grid = PIL.Image.new("RGB", (width, len(rows) * (tile + label_h + pad) + pad), "white")
    draw = PIL.ImageDraw.Draw(grid)
    y = pad
    for key, tiles in rows:
        draw.text((pad, y), key, fill="black")
        for j, (kind, im) in enumerate(tiles):
            x = pad + j * (tile + pad)
            grid.paste(im.convert("RGB").resize((tile, tile), PIL.Image.Resampling.NEAREST), (x, y + label_h))
            draw.rectangle([x - 1, y + label_h - 1, x + tile, y + label_h + tile], outline="blue" if kind == "in" else "gray")
        y += tile + label_h + pad
    grid.save(path)


# ----- command ---------------------------------------------------------------------------------------------


def run_demo(args) -> dict:
    import torch

    from .world.gill_tiny import load_gill_tiny_pipeline
    from .world.judge import load_judge

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    progress = _Progress(len(SECTIONS) + 1)
    pipe = load_gill_tiny_pipeline(args.model, args.sd)
    dataset = pipe.retrieval_index.dataset
    judge = load_judge()
    progress.step(f"loaded GILL-tiny, world SD, judge and a {len(dataset)}-image retrieval index")
    results = {}
    runners = {"text-to-image": text_to_image, "image-to-text": image_to_text,
               "image-and-text-to-image": image_and_text_to_image, "dialogue": dialogue}
    with torch.no_grad():
        for key, title in SECTIONS:
            if key == "retrieve-or-generate":
                results[key] = retrieve_or_generate(pipe, judge, args, dataset)
            else:
                results[key] = runners[key](pipe, judge, args)
            progress.step(title)
    meta = {"seed": args.seed, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "model": str(args.model or "gill_hf/world/assets/gill_tiny"), "sd": str(args.sd or "gill_hf/world/assets/sd"),
            "decision_head": pipe.gill_model.config.decision_head_type, "wall_s": round(time.time() - start, 1)}
    output_dir = Path(args.output_dir)
    summary = write_report(results, output_dir, meta)
    print(f"GILL-tiny demo ({meta['wall_s']} s): {output_dir / 'report.html'}, {output_dir / 'grid.png'}")
    for key, title in SECTIONS:
        print(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in summary[key].items()))
    return {"meta": meta, "summary": summary, "results": results}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="demo_out", help="Where report.html, grid.png and summary.json go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the examples, the sampling and the latents.")
    parser.add_argument("--steps", type=int, default=25, help="Diffusion steps per generated image (DDIM).")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="Classifier-free guidance of the world SD.")
    parser.add_argument("--num-examples", type=int, default=4, help="Examples per section (dialogue and decision: fixed).")
    parser.add_argument("--caption-tokens", type=int, default=24, help="Token budget of text answers.")
    parser.add_argument("--model", default=None, help="GILL-tiny folder (default: the shipped adapter).")
    parser.add_argument("--sd", default=None, help="World SD folder (default: the shipped one).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="Run GILL-tiny on the embedded world and write report.html + grid.png.")
    add_arguments(parser)
    parser.set_defaults(func=run_demo)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gill_hf.demo")
    add_arguments(parser)
    run_demo(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
