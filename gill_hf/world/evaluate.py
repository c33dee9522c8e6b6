"""Acceptance measurements of the shipped world models, and their cards.

`python -m gill_hf.world evaluate [judge clip vae sd] --update-cards` recomputes every
number on fresh seeds (never the training stream) and rewrites metrics.json + README.md in
each asset folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .common import asset_path, read_json, set_threads, write_json
from .data import generate_arrays, sample_example
from .render import COLOUR_NAMES, POSITIONS, SHAPES, SIZES

SD_GUIDANCE = 4.0
SD_STEPS = 25


def eval_captions(n: int, split: str, seed: int) -> tuple[list[str], list[dict]]:
    """n single-object captions (natural phrasings) and their labels from a split."""
    caps, labels = [], []
    for i in range(n):
        scene, cap = sample_example(seed, split, i, num_objects=1)
        caps.append(cap)
        labels.append(scene.labels())
    return caps, labels


@torch.no_grad()
def generate_images(pipe, captions: list[str], steps: int, guidance: float, seed: int,
                    batch_size: int = 50, guidance_rescale: float = 0.0) -> np.ndarray:
    out = []
    for i in range(0, len(captions), batch_size):
        g = torch.Generator().manual_seed(seed + i)
        r = pipe(captions[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                 guidance_rescale=guidance_rescale, generator=g, output_type="np")
        out.append((r.images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def judge_single(judge, images: np.ndarray, labels: list[dict]) -> dict[str, float]:
    """Judge single-object samples: the most confident position is the object."""
    p = judge.predict(images)
    k = p["present"].argmax(1)
    n = np.arange(len(images))
    res = {}
    hits = np.ones(len(images), dtype=bool)
    for attr, vocab, got in (("shape", SHAPES, p["shape"][n, k]), ("colour", COLOUR_NAMES, p["colour"][n, k]),
                             ("size", SIZES, p["size"][n, k]), ("position", POSITIONS, k)):
        truth = np.array([vocab.index(l[attr + "s"][0]) for l in labels])
        ok = got == truth
        res[attr] = float(ok.mean())
        hits &= ok
    res["all_four"] = float(hits.mean())
    res["n"] = len(images)
    return res


def sd_report(pipe, n: int = 200, steps: int = SD_STEPS, guidance: float = SD_GUIDANCE, seed: int = 0,
              splits: tuple[str, ...] = ("validation", "heldout"), judge=None,
              guidance_rescale: float = 0.0, grid_dir: str | Path | None = None) -> dict:
    """World SD judged on n single-object captions per split (validation = unseen scenes
    of seen combinations; heldout = shape/colour pairs never seen in training)."""
    from .judge import load_judge

    judge = judge or load_judge()
    res = {}
    for split in splits:
        caps, labels = eval_captions(n, split, seed + 303)
        imgs = generate_images(pipe, caps, steps, guidance, seed, guidance_rescale=guidance_rescale)
        res[split] = judge_single(judge, imgs, labels)
        if grid_dir is not None:
            save_grid(imgs[:32], caps[:32], Path(grid_dir) / f"samples_{split}.png")
    res["settings"] = {"n": n, "steps": steps, "guidance_scale": guidance,
                       "guidance_rescale": guidance_rescale, "scheduler": "DDIM trailing, zero-SNR"}
    return res


def save_grid(images: np.ndarray, captions: list[str], path: Path, cols: int = 8,
              scale: int = 3) -> None:
    """Samples upscaled x3 in a grid, with their captions listed in a sidecar .txt."""
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    s = images.shape[1] * scale
    grid = Image.new("RGB", (cols * s, rows * s), "white")
    for i, im in enumerate(images):
        tile = Image.fromarray(im).resize((s, s), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % cols) * s, (i // cols) * s))
    grid.save(path)
    path.with_suffix(".txt").write_text("\n".join(f"{i}: {c}" for i, c in enumerate(captions)) + "\n")


def load_sd(path: str | Path | None = None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path or asset_path("sd")), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate_all(which: list[str], seed: int = 0, threads: int = 2, update_cards: bool = False) -> dict:
    set_threads(threads)
    out = {}
    if "judge" in which:
        from .judge import judge_report, load_judge

        out["judge"] = judge_report(load_judge(), seed)
    if "clip" in which:
        from .clip import clip_report, load_clip

        model, proc = load_clip()
        out["clip"] = clip_report(model, proc.tokenizer, seed)
    if "vae" in which or "sd" in which:
        pipe = load_sd()
        if "vae" in which:
            from .judge import load_judge
            from .sd import vae_report

            out["vae"] = vae_report(pipe.vae, seed, judge=load_judge())
        if "sd" in which:
            t = time.time()
            out["sd"] = sd_report(pipe, seed=seed, grid_dir=asset_path("sd") if update_cards else None)
            out["sd"]["wall_s"] = round(time.time() - t, 1)
    if update_cards:
        for name, metrics in out.items():
            folder = asset_path("sd" if name == "vae" else name)
            mpath = folder / "metrics.json"
            current = read_json(mpath) if mpath.exists() else {}
            current[name] = metrics
            write_json(mpath, current)
            write_card(folder)
    return out


CARD_DATA = {
    "judge": "its own stream of the world (`judge`, seed 0: every combination, held-out pairs included)",
    "clip": "the world's `train` split (seed 0; the shape/colour pairs of `HELDOUT_PAIRS` never seen)",
    "sd": "the world's `train` split (seed 0; the shape/colour pairs of `HELDOUT_PAIRS` never seen)",
}
CARD_TEXT = {
    "judge": ("World attribute judge", "A 0.6 M-parameter CNN (not the world CLIP) that predicts, for each of "
              "the five positions, object presence, shape, colour and size. Used only for evaluation. "
              "Load: `gill_hf.world.judge.load_judge()` (a diffusers `ModelMixin`, so "
              "`WorldJudge.from_pretrained(folder)` works)."),
    "clip": ("World CLIP", "A small `transformers.CLIPModel` (ViT patch 8 on 32x32, 4 layers; text 3 layers, "
             "width 128) with its own BPE `CLIPTokenizer` trained on world captions; trained contrastively. "
             "Load with `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained`."),
    "sd": ("World Stable Diffusion", "`StableDiffusionPipeline` folder: `AutoencoderKL` (32x32 -> 4x8x8), "
           "`UNet2DConditionModel` conditioned on the world CLIP text encoder's `last_hidden_state` (77 "
           "tokens), DDIM scheduler with trailing spacing, zero terminal SNR, v-prediction; trained with "
           "10% caption dropout for classifier-free guidance."),
}


def write_card(folder: Path) -> None:
    """README.md card from training_info*.json and metrics.json (numbers only as measured)."""
    name = folder.name
    title, desc = CARD_TEXT[name]
    lines = [f"# {title}", "", desc, "",
             f"Data: {CARD_DATA[name]}, generated by `gill_hf.world`. Metrics use fresh seeds. "
             "Reproduce: see the README section 'The embedded world' (one command per model). Wall times: a 2-core CPU "
             "shared with two other jobs, one torch thread.", ""]
    for info_path in sorted(folder.glob("training_info*.json")):
        info = read_json(info_path)
        lines.append(f"## Training ({info_path.stem})")
        lines.append("")
        for k in ("steps", "batch_size", "lr", "n_train", "threads", "train_wall_s", "total_wall_s",
                  "scaling_factor", "edge_weight", "cooldown_steps", "cfg_dropout", "ema_decay", "evals",
                  "val_psnr_curve"):
            if k in info:
                lines.append(f"- {k}: {info[k]}")
        lines.append("")
    mpath = folder / "metrics.json"
    if mpath.exists():
        lines += ["## Metrics (measured by `python -m gill_hf.world evaluate`)", "", "```json",
                  mpath.read_text().strip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines))
