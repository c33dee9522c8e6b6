"""What `gill-hf eval vist` and `gill-hf eval visdial` share: a run over cases (a context -> the real
image it should produce) that draws GILL's image and the text-only decoder baseline's, scores both by
CLIP image-image similarity to the real image, ranks the real image among the split's pool with
GILL's retrieval embedding, keeps a resumable `results.json` and a per-example `examples.jsonl`, and
prints the table (mean and seed standard deviation per setting).

FID / LPIPS (`--fid`, `--lpips`) use networks from the optional `eval` extra (pytorch-fid, lpips), imported
only when asked; `fid_score` / `lpips_score` take the network as an argument.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .images import check_image_size
from .metrics.functional import frechet_distance, paired_cosine, recall_from_ranks, retrieval_ranks


@dataclass
class EvalCase:
    """One example of one setting: GILL's prompt, the baseline's text, the real image it should produce."""

    id: str
    setting: str
    prompt: list  # strings and images (PIL images or `Path`s, opened when the case runs), in order
    text: str  # the text-only baseline's prompt (the context's text, concatenated)
    target: PIL.Image.Image | Path
    target_key: str = ""  # the real image's key in the retrieval pool
    extra: dict = field(default_factory=dict)


def open_rgb(item: PIL.Image.Image | Path) -> PIL.Image.Image:
    """An RGB image from a PIL image or a `Path` (opened now, so that a split of thousands of photos is
    never held in memory at once)."""
    if isinstance(item, PIL.Image.Image):
        return item.convert("RGB")
    try:
        with PIL.Image.open(item) as image:
            check_image_size(*image.size, name=str(item))
            return image.convert("RGB")
    except OSError as error:  # truncated or not an image: name the file
        raise ValueError(f"{str(item)!r} is not a readable image: {error}") from error


def readable_image(path: Path) -> bool:
    """Whether `path`'s header opens as an image within the size bounds (cheap: no pixels decoded);
    benchmark readers skip and count the others, as public splits have broken files."""
    try:
        with PIL.Image.open(path) as image:
            check_image_size(*image.size, name=str(path))
        return True
    except (OSError, ValueError):
        return False


def opened(prompt: list) -> list:
    """A prompt with its `Path` items opened (strings stay text)."""
    return [open_rgb(item) if isinstance(item, Path) else item for item in prompt]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


class ClipScorer:
    """Normalised CLIP image embeddings from a CLIP checkpoint folder (e.g. ViT-L/14, or the world CLIP)."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 64):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(os.fspath(path), dtype=torch.float32).eval()
        self.processor, self.batch_size = CLIPProcessor.from_pretrained(os.fspath(path)), batch_size

    @torch.no_grad()
    def embed(self, images: list[PIL.Image.Image | Path]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=[open_rgb(im) for im in images[start:start + self.batch_size]], return_tensors="pt")
            chunks.append(self.model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output.float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


class BenchmarkRun:
    """A resumable evaluation run in `output_dir`: `results.json` (scores so far, per setting, seed and
    case), `examples.jsonl` (one line per case and seed, with the image paths), `images/`."""

    def __init__(self, output_dir: str | os.PathLike, meta: dict):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.output_dir / "results.json"
        saved = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        if saved and {k: v for k, v in saved.get("meta", {}).items() if k != "wall_s"} != {k: v for k, v in meta.items() if k != "wall_s"}:
            raise ValueError(f"{str(self.results_path)!r} holds a run with other settings ({saved.get('meta')}); "
                             "use another --output-dir or remove it.")
        self.meta = meta
        self.generation: dict = saved.get("generation", {})  # setting -> seed -> case id -> {"gill": cos, "baseline": cos}
        self.retrieval: dict = saved.get("retrieval", {})  # setting -> {"ranks": {...}, "pool_size": n}

    def done(self, setting: str, seed: int, case_id: str) -> bool:
        return case_id in self.generation.get(setting, {}).get(str(seed), {})

    def record(self, case: EvalCase, seed: int, scores: dict, images: dict[str, PIL.Image.Image]) -> None:
        folder = self.output_dir / "images" / slug(case.setting) / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, image in images.items():
            paths[name] = str(folder / f"{slug(case.id)}-{name}.png")
            image.save(paths[name])
        self.generation.setdefault(case.setting, {}).setdefault(str(seed), {})[case.id] = scores
        with open(self.output_dir / "examples.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"id": case.id, "setting": case.setting, "seed": seed, **scores, "images": paths}) + "\n")

    def save(self) -> None:
        temporary = self.results_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"meta": self.meta, "generation": self.generation, "retrieval": self.retrieval}, indent=1))
        os.replace(temporary, self.results_path)  # an interrupted run keeps the last complete file

    def table(self) -> list[dict]:
        """Per setting: each system's mean CLIP similarity over cases and seeds, the standard deviation of
        the per-seed means, the count; then the retrieval rows."""
        rows = []
        for setting, seeds in self.generation.items():
            for system in ("gill", "baseline"):
                per_seed = [statistics.mean(c[system] for c in cases.values()) for cases in seeds.values() if cases]
                if per_seed:
                    rows.append({"setting": setting, "system": system, "clip_similarity": statistics.mean(per_seed),
                                 "seed_std": statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0,
                                 "n": sum(len(c) for c in seeds.values()), "seeds": len(per_seed)})
        for setting, result in self.retrieval.items():
            ranks = torch.tensor(list(result["ranks"].values()))
            rows.append({"setting": setting, "system": "gill retrieval", **recall_from_ranks(ranks),
                         "pool_size": result["pool_size"], "n": len(ranks)})
        return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| setting | system | CLIP similarity (mean ± seed std) | R@1 / R@5 / R@10 | n | pool |", "|---|---|---|---|---|---|"]
    for row in rows:
        clip = f"{row['clip_similarity']:.3f} ± {row['seed_std']:.3f}" if "clip_similarity" in row else ""
        recall = " / ".join(f"{row[k]:.3f}" for k in ("r@1", "r@5", "r@10")) if "r@1" in row else ""
        lines.append(f"| {row['setting']} | {row['system']} | {clip} | {recall} | {row['n']} | {row.get('pool_size', '')} |")
    return "\n".join(lines)


def run_generation(run: BenchmarkRun, cases: list[EvalCase], pipe, baseline, scorer: ClipScorer, seeds: list[int],
                   steps: int, guidance: float, batch_size: int = 8) -> None:
    """GILL's image and the baseline's for every case and seed not yet in `run`, scored against the real
    image; saved after every batch (an interrupted run continues where it stopped). The baseline's
    text encoder keeps its first `model_max_length` tokens: how many prompts it cuts is said once
    (diffusers' per-batch warning is silenced)."""
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    todo = [(seed, case) for seed in seeds for case in cases if not run.done(case.setting, seed, case.id)]
    tokenizer = getattr(baseline, "tokenizer", None)
    if tokenizer is not None and todo:
        texts = {case.text for _, case in todo}
        cut = sum(len(tokenizer(text).input_ids) > tokenizer.model_max_length for text in texts)
        print(f"[eval] the text-only baseline keeps the first {tokenizer.model_max_length} tokens: {cut} of {len(texts)} "
              "prompts are cut", flush=True)
    with tqdm(total=len(todo), desc="generation cases", unit="case") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k, (seed, _) in enumerate(batch, start)]
            out = pipe(prompt=[opened(case.prompt) for _, case in batch], force_image=True, image_source="generated", max_new_tokens=8,
                       max_images=1, num_inference_steps=steps, guidance_scale=guidance, generator=generators)
            gill = [images[0] for images in out.images]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k, (seed, _) in enumerate(batch, start)]
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # its truncation warning, said once above
            try:
                base = baseline([case.text for _, case in batch], num_inference_steps=steps, guidance_scale=guidance,
                                generator=generators).images
            finally:
                diffusers_logging.set_verbosity(verbosity)
            real = scorer.embed([case.target for _, case in batch])
            gill_cos = paired_cosine(scorer.embed(gill), real).tolist()
            base_cos = paired_cosine(scorer.embed(base), real).tolist()
            for k, (seed, case) in enumerate(batch):
                run.record(case, seed, {"gill": gill_cos[k], "baseline": base_cos[k]}, {"gill": gill[k], "baseline": base[k]})
            run.save()
            bar.update(len(batch))


@torch.no_grad()
def context_retrieval_embeds(model, processor, prompts: list[list], batch_size: int = 16) -> torch.Tensor:
    """GILL's retrieval embedding of the `[IMG0]` state that follows each context (one text pass)."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        rows = processor.build_interleaved_training_inputs([opened(p) for p in prompts[start:start + batch_size]], max_length=model.config.text_config.max_position_embeddings)
        device = model.img_embeddings.device
        out = model(input_ids=rows["input_ids"].to(device), interleaved=torch.ones(rows["input_ids"].shape[0], dtype=torch.bool),
                    context_pixel_values=rows["context_pixel_values"].to(device) if "context_pixel_values" in rows else None)
        chunks.append(model.get_text_retrieval_embeds(out.img_hidden_states).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def image_retrieval_embeds(model, processor, images: list[PIL.Image.Image | Path], batch_size: int = 64) -> torch.Tensor:
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(images=[open_rgb(im) for im in images[start:start + batch_size]], return_tensors="pt")
        chunks.append(model.get_image_retrieval_embeds(pixel_values=pixels["pixel_values"].to(model.img_embeddings.device)).float().cpu())
    return torch.cat(chunks)


def run_retrieval(run: BenchmarkRun, setting: str, cases: list[EvalCase], pool: dict[str, PIL.Image.Image | Path], model, processor) -> None:
    """Ranks each case's real image among the pool (every distinct image of the split) by GILL's retrieval
    embeddings; R@1/5/10 go to the table with the pool size."""
    keys = list(pool)
    pool_embeds = image_retrieval_embeds(model, processor, [pool[k] for k in keys])
    queries = context_retrieval_embeds(model, processor, [case.prompt for case in cases])
    ranks = retrieval_ranks(queries, pool_embeds, [keys.index(case.target_key) for case in cases])
    run.retrieval[setting] = {"ranks": {case.id: int(r) for case, r in zip(cases, ranks)}, "pool_size": len(keys)}
    run.save()


def fid_score(generated: list[PIL.Image.Image], real: list[PIL.Image.Image], features: Callable[[list], torch.Tensor]) -> float:
    """FID with any feature network (`features(images) -> (n, d)`; Inception-v3 pool features for the
    standard number, `inception_features()`)."""
    return frechet_distance(features(generated), features(real))


def lpips_score(generated: list[PIL.Image.Image], real: list[PIL.Image.Image], distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                size: int = 256) -> float:
    """Mean perceptual distance between paired images (`distance(a, b)` on (n, 3, size, size) tensors in
    [-1, 1]: LPIPS with `lpips_distance()`)."""
    def tensor(images):
        return torch.stack([torch.from_numpy(np.asarray(open_rgb(im).resize((size, size)), dtype=np.float32))
                            .permute(2, 0, 1) / 127.5 - 1 for im in images])

    with torch.no_grad():
        return distance(tensor(generated), tensor(real)).float().mean().item()


def inception_features() -> Callable[[list], torch.Tensor]:  # pragma: no cover - needs the eval extra
    """Inception-v3 pool features (pytorch-fid; `pip install gill-hf[eval]`, which needs torchvision)."""
    from pytorch_fid.inception import InceptionV3

    network = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    @torch.no_grad()
    def features(images):
        batch = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((299, 299)), dtype="float32")).permute(2, 0, 1) / 255
                             for im in images])
        return network(batch)[0].flatten(1)

    return features


def lpips_distance() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:  # pragma: no cover - needs the eval extra
    """LPIPS (AlexNet) from the `lpips` package (`pip install gill-hf[eval]`)."""
    import lpips

    network = lpips.LPIPS(net="alex").eval()
    return lambda a, b: network(a, b).flatten()


def add_common_arguments(parser) -> None:
    parser.add_argument("--pipeline", default=None, help="A saved GillPipeline folder (default: GILL-tiny).")
    parser.add_argument("--sd", default=None, help="The decoder's own Stable Diffusion folder for the text-only baseline "
                                                   "(default: GILL-tiny's world SD).")
    parser.add_argument("--clip", required=True, help="CLIP checkpoint (folder or repo id) scoring image similarity (the "
                                                      "paper: openai/clip-vit-large-patch14); `world`: the embedded world CLIP.")
    parser.add_argument("--output-dir", required=True, help="results.json, examples.jsonl and images/ (a rerun continues).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="Diffusion steps (default: the pipeline's).")
    parser.add_argument("--guidance-scale", type=float, default=None, help="Guidance (default: the pipeline's).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fid", action="store_true", help="Also FID per setting (needs `pip install gill-hf[eval]`).")
    parser.add_argument("--lpips", action="store_true", help="Also LPIPS per setting (needs `pip install gill-hf[eval]`).")
    parser.add_argument("--threads", type=int, default=0)


def load_systems(args):
    """(GILL pipeline, text-only baseline pipeline, CLIP scorer) for a run."""
    from diffusers import StableDiffusionPipeline

    from .world.gill_tiny import CLIP_DIR, SD_DIR, load_gill_tiny_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pipeline:
        from .pipelines import GillPipeline

        pipe = GillPipeline.from_pretrained(args.pipeline)
    else:
        pipe = load_gill_tiny_pipeline(retrieval=False)
    pipe.set_progress_bar_config(disable=True)
    baseline = StableDiffusionPipeline.from_pretrained(args.sd or str(SD_DIR), safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    baseline.set_progress_bar_config(disable=True)
    return pipe, baseline, ClipScorer(CLIP_DIR if args.clip == "world" else args.clip)


def run_benchmark(args, name: str, cases: list[EvalCase], pool: dict[str, PIL.Image.Image | Path], skipped: dict,
                  retrieval_settings: list[str], unit: str, per_unit: int) -> list[dict]:
    """A whole benchmark run: the systems loaded, generation for every case and seed, retrieval for
    `retrieval_settings`, the table (see `finish`). `unit` names the counted item (stories, dialogs)."""
    start = time.time()
    pipe, baseline, scorer = load_systems(args)
    steps = args.steps or pipe.config.default_num_inference_steps
    guidance = args.guidance_scale or pipe.config.default_guidance_scale
    meta = {"benchmark": name, "data_dir": str(args.data_dir), "split": args.split, unit: len(cases) // per_unit, "seeds": args.seeds,
            "steps": steps, "guidance_scale": guidance, "clip": args.clip, "pipeline": args.pipeline or "GILL-tiny", "skipped": dict(skipped)}
    run = BenchmarkRun(args.output_dir, meta)
    print(f"[eval {name}] {meta[unit]} {unit} x {len(args.seeds)} seeds; skipped {dict(skipped)}; pool {len(pool)} images", flush=True)
    run_generation(run, cases, pipe, baseline, scorer, args.seeds, steps, guidance, args.batch_size)
    for setting in retrieval_settings:
        run_retrieval(run, setting, [c for c in cases if c.setting == setting], pool, pipe.gill_model, pipe.processor)
    run.meta["wall_s"] = round(time.time() - start, 1)
    run.save()
    return finish(run, cases, args)


def finish(run: BenchmarkRun, cases: list[EvalCase], args) -> list[dict]:
    """Optional FID / LPIPS per setting over the saved images, then the table (printed and saved)."""
    rows = run.table()
    if args.fid or args.lpips:
        features = inception_features() if args.fid else None
        distance = lpips_distance() if args.lpips else None
        by_setting: dict[str, list[EvalCase]] = {}
        for case in cases:
            by_setting.setdefault(case.setting, []).append(case)
        for setting, setting_cases in by_setting.items():
            folder = run.output_dir / "images" / slug(setting) / f"seed{args.seeds[0]}"
            generated = [PIL.Image.open(folder / f"{slug(c.id)}-gill.png") for c in setting_cases]
            real = [open_rgb(c.target) for c in setting_cases]
            extra = {"setting": setting, "system": "gill", "n": len(real)}
            if features is not None:
                extra["fid"] = fid_score(generated, real, features)
            if distance is not None:
                extra["lpips"] = lpips_score(generated, real, distance)
            rows.append(extra)
    (run.output_dir / "table.json").write_text(json.dumps(rows, indent=1))
    print(format_table(rows))
    return rows


__all__ = ["BenchmarkRun", "ClipScorer", "EvalCase", "context_retrieval_embeds", "fid_score", "format_table", "image_retrieval_embeds",
           "lpips_score", "open_rgb", "readable_image", "run_benchmark", "run_generation", "run_retrieval"]
