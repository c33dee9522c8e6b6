"""`gill-hf demo`: GILL-tiny on the embedded world, every capability on fresh seeded examples.

    gill-hf demo --output-dir demo_out [--seed 0] [--steps 25] [--model PATH] [--sd PATH]

Runs through `GillPipeline` (GILL-tiny adapter + world SD + a retrieval index over world images
GILL-tiny never trained on):

1. text -> generated image (captions of fresh scenes; each image read by the world judge);
2. image -> caption (the first sentence, checked: the scene's colour and shape, no other);
3. story -> image, 4. image + edit instruction -> image, 5. two images -> their combination,
   6. a dialogue follow-up in the LM's own chat template (ChatML: SmolLM2-135M-Instruct was tuned on
   it): examples of the world's `context_test` split, whose final scene depends on the context; each
   generated image judged against the exact target scene;
7. prompts whose scene is in the retrieval set and prompts whose scene is not, answered with
   `image_source="auto"`: the decision head's probabilities, its choice, and the shown image judged
   against the prompt's scene.

Writes `report.html` (inputs, outputs and the judge's reading side by side; images inline as base64
PNG), `grid.png` and `summary.json` to the output folder and prints a short summary. Every example
comes from a seed of its own (never a training stream), so a rerun with the same `--seed`
reproduces the report."""

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

import numpy as np

from .world.context import STORY_KINDS
from .world.eval_context import EDITED, context_cases, context_prompt
from .world.scoring import ATTRIBUTES, caption_check, describe, first_sentence, read_single_objects, scene_attributes

SECTIONS = (
    ("text-to-image", "Text -> generated image"),
    ("image-to-text", "Image -> caption (its first sentence)"),
    ("story", "Story -> image (the final scene depends on earlier sentences)"),
    ("image-edit", "Image + edit instruction -> edited image"),
    ("combine", "Two images -> their combination"),
    ("dialogue", "Dialogue follow-up (the LM's chat template)"),
    ("retrieve-or-generate", "Retrieve or generate (decision head)"),
)
# The contextual sections draw from the world's `context_test` split (phrasings never seen in training).
CONTEXT_SECTIONS = {"story": STORY_KINDS, "image-edit": tuple(EDITED), "combine": ("combine",), "dialogue": ("dialogue",)}
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
    """A tqdm bar over the demo's steps, with one line per finished step above it."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar, self.start = tqdm(total=total, desc="GILL-tiny demo", unit="section"), time.time()

    def step(self, what: str) -> None:
        self.bar.update(1)
        self.bar.write(f"[demo {self.bar.n}/{self.bar.total} | {time.time() - self.start:5.1f} s] {what}")
        if self.bar.n == self.bar.total:
            self.bar.close()


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


def context_section(pipe, judge, args, kinds: tuple[str, ...]) -> list[Item]:
    """`--num-examples` context_test examples cycling through `kinds`, one batched pipeline call, each
    generated image judged against the exact target scene."""
    count = args.num_examples if len(kinds) > 1 else max(2, args.num_examples // 2)
    per_kind = -(-count // len(kinds))
    cases = context_cases(kinds, per_kind, DEMO_SEED_BASE + 4000 + args.seed, pipe.processor.tokenizer)
    rows = [cases[kinds[i % len(kinds)]][i // len(kinds)] for i in range(count)]
    prompts = [context_prompt(row) for row in rows]
    out = pipe(prompt=prompts, force_image=True, image_source="generated", max_new_tokens=8, max_images=1,
               generator=_generators(args.seed + 500 + len(kinds), len(prompts)), **_gen_kwargs(args))
    generated = [images[0] for images in out.images]
    items = []
    for row, prompt, image, seen in zip(rows, prompts, generated, read_single_objects(judge, generated)):
        truth = {attr: row[attr] for attr in ATTRIBUTES}
        text = " ".join(p for p in prompt if isinstance(p, str)) if row["kind"] != "dialogue" else row["context_text"]
        items.append(Item(prompt=f"[{row['kind']}] {text}", images_in=[p for p in prompt if not isinstance(p, str)],
                          images_out=[image], checks={attr: seen[attr] == truth[attr] for attr in ATTRIBUTES},
                          notes=[f"target: {describe(truth)}", f"judge sees: {describe(seen)}"]))
    return items


def retrieve_or_generate(pipe, judge, args, dataset) -> list[Item]:
    """Prompts whose scene is in the retrieval set and prompts whose scene is not (half each, at least
    eight), answered with `image_source="auto"`. Each shown image is judged against the prompt's
    scene: a retrieved one by its exact labels, a generated one by the world judge."""
    from .world.gill_tiny import decision_prompts, scene_key

    prompts = decision_prompts(max(8, 2 * args.num_examples), seed=DEMO_SEED_BASE + args.seed, index_dataset=dataset)
    has_head = pipe.gill_model.config.decision_head_type is not None
    out = pipe(prompt=[text for text, _, _ in prompts], force_image=True, image_source="auto" if has_head else "generated",
               max_new_tokens=8, max_images=1, num_retrieved=3, generator=_generators(args.seed + 400, len(prompts)),
               **_gen_kwargs(args))
    keys = [scene_key(row) for row in dataset.select_columns(["shapes", "colours", "sizes", "positions"])]
    items = []
    for i, (text, truth, labels) in enumerate(prompts):
        source, image = out.image_sources[i][0], out.images[i][0]
        notes = [f"ground truth: {truth} (the scene is {'in' if truth == 'retrieve' else 'not in'} the retrieval set)"]
        checks = {}
        if out.decision_probs is not None and len(out.decision_probs[i]):
            probs = out.decision_probs[i][0].tolist()
            notes.append(f"decision probabilities: generate {probs[0]:.3f}, retrieve {probs[1]:.3f} -> {source}")
            checks["decision"] = (source == "retrieved") == (truth == "retrieve")
        if source == "retrieved":
            shown = keys[int(out.retrieval_indices[i][0][0])]
            notes.append(f"retrieved image {int(out.retrieval_indices[i][0][0])}: " + "; ".join(" ".join(o) for o in shown))
        else:
            seen = judge.describe(np.asarray(image.convert("RGB").resize((32, 32)))[None])[0]
            shown = tuple(sorted((o["shape"], o["colour"], o["size"], o["position"]) for o in seen))
            notes.append("judge sees: " + ("; ".join(" ".join(o) for o in shown) or "nothing"))
        checks["image matches the prompt"] = shown == scene_key(labels)
        items.append(Item(prompt=text, images_out=[image], notes=notes, checks=checks, text_out=f"image source: {source}"))
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


class StageClock:
    """Wall time spent inside given modules' forward calls (PyTorch forward hooks), per stage; what a
    section spent elsewhere (tokenizing, the schedulers, images, Python) is its `other`."""

    def __init__(self, stages: dict[str, object]):
        self.totals = dict.fromkeys(stages, 0.0)
        self._started: dict[str, float] = {}
        for name, module in stages.items():
            module.register_forward_pre_hook(lambda _m, _a, name=name: self._started.__setitem__(name, time.perf_counter()))
            module.register_forward_hook(lambda _m, _a, _o, name=name: self._stop(name))

    def _stop(self, name: str) -> None:
        self.totals[name] += time.perf_counter() - self._started.pop(name)

    def section(self, wall: float) -> dict[str, float]:
        """The stages' times since the last call, with the section's wall time and the rest."""
        # 4 decimals: a fast stage (the judge, a few ms) must not round to zero
        spent = {name: round(value, 4) for name, value in self.totals.items()}
        self.totals = dict.fromkeys(self.totals, 0.0)
        return {"wall": round(wall, 4), **spent, "other": round(wall - sum(spent.values()), 4)}


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
    timings = {"load": round(time.time() - start, 2)}
    progress.step(f"loaded GILL-tiny, world SD, judge and a {len(dataset)}-image retrieval index")
    clock = StageClock({"decode (LM)": pipe.gill_model.language_model, "vision": pipe.gill_model.vision_model,
                        "denoise (UNet)": pipe.unet, "judge": judge})  # the VAE decodes outside forward: in "other"
    results = {}
    runners = {"text-to-image": text_to_image, "image-to-text": image_to_text}
    with torch.no_grad():
        for key, title in SECTIONS:
            section_start = time.time()
            if key == "retrieve-or-generate":
                results[key] = retrieve_or_generate(pipe, judge, args, dataset)
            elif key in CONTEXT_SECTIONS:
                results[key] = context_section(pipe, judge, args, CONTEXT_SECTIONS[key])
            else:
                results[key] = runners[key](pipe, judge, args)
            timings[key] = clock.section(time.time() - section_start)
            progress.step(title)
    meta = {"seed": args.seed, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "model": str(args.model or "gill_hf/world/assets/gill_tiny"), "sd": str(args.sd or "gill_hf/world/assets/sd"),
            "decision_head": pipe.gill_model.config.decision_head_type, "wall_s": round(time.time() - start, 1),
            "timings_s": timings}
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
