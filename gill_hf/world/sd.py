"""World Stable Diffusion: an `AutoencoderKL` and a `UNet2DConditionModel` conditioned on
the world CLIP's text encoder (`last_hidden_state`, 77 tokens), packed as a standard
`StableDiffusionPipeline` folder.

32x32 images, VAE factor 4 -> 4x8x8 latents: the UNet's cost on two CPU cores is set by
the latent size, and 8x8 is what trains in about an hour there. The noise schedule is
cosine with zero terminal SNR, v-prediction and "trailing" timesteps: at inference the
first step then starts from pure noise, which fixes the tinted, noisy backgrounds that an
epsilon-model trained without terminal SNR leaves (ENVIRONMENT.md's probe).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)

from .common import (Checkpoint, asset_path, plot_curves, progress, save_fp16, seed_everything,
                     set_threads, smooth, to_tensor, to_uint8, trained_asset_dir, write_json)
from .data import cache_dir, generate_arrays, sample_example
from .scoring import read_single_objects, scene_attributes, score_readings

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                prediction_type="v_prediction", rescale_betas_zero_snr=True,
                timestep_spacing="trailing")
CFG_DROPOUT = 0.1  # share of training captions replaced by "" for classifier-free guidance


# ----------------------------------------------------------------------------- VAE

def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        # Narrow at full resolution (16 channels at 32x32), where a CPU step's cost lies.
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR in dB between uint8 image arrays."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, bs: int = 256) -> np.ndarray:
    vae.eval()
    outs = []
    for i in range(0, len(images), bs):
        x = to_tensor(images[i:i + bs])
        z = vae.encode(x).latent_dist.mode()
        outs.append(to_uint8(vae.decode(z).sample))
    return np.concatenate(outs)


def train_vae(steps: int = 1500, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
              n_train: int = 60000, kl_weight: float = 1e-6, threads: int = 1,
              out_dir: str | Path | None = None, resume: bool = True,
              decoder_only: bool = False, edge_weight: float = 0.0) -> dict:
    """Train the VAE; `decoder_only` continues a trained VAE (read from out_dir) with its
    encoder frozen, so the latent space (and a UNet trained on it) stays valid while the
    reconstructions sharpen. `edge_weight` adds an L1 loss on the image gradients (the
    gradient-difference loss), which keeps the corners of 8-pixel shapes that MSE blurs."""
    set_threads(threads)
    seed_everything(seed)
    t_start = time.time()
    data = generate_arrays(n_train, "train", seed)
    x_all = to_tensor(data["images"])
    out = Path(out_dir or cache_dir() / "vae")
    if decoder_only:
        vae = AutoencoderKL.from_pretrained(str(out), torch_dtype=torch.float32)
        scaling = vae.config.scaling_factor
        vae.encoder.requires_grad_(False); vae.quant_conv.requires_grad_(False)
        params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    else:
        vae = make_vae()
        params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    # Each stage keeps its own checkpoint and records (vae, vae_decoder, vae_decoder_edge1, ...).
    edge = f"_edge{edge_weight:g}" if edge_weight else ""
    stage = ("_decoder" if decoder_only else "") + edge
    ckpt = Checkpoint(f"vae{'-dec' if decoder_only else ''}{edge.replace('_', '-')}-s{seed}", every_s=120)
    g = torch.Generator().manual_seed(seed)
    step, hist, elapsed = ckpt.restore(vae, opt, sched, g, {"loss": [], "val_psnr": []}, resume)
    val = generate_arrays(500, "validation", seed + 1)
    t0 = time.time() - elapsed
    bar = progress(steps, step, "vae")
    while step < steps:
        vae.train()
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x = x_all[idx]
        if decoder_only:
            vae.encoder.eval()
            with torch.no_grad():
                post = vae.encode(x).latent_dist
        else:
            post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        # MSE drives PSNR; L1 sharpens the flat-colour edges.
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + kl_weight * post.kl().mean()
        if edge_weight:
            loss = loss + edge_weight * image_gradient_l1(rec, x)
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step(); sched.step()
        step += 1
        hist["loss"].append((step, loss.item()))
        bar.update(1); bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 500 == 0 or step == steps:
            p = psnr(val["images"], reconstruct(vae, val["images"]))
            hist["val_psnr"].append((step, p))
            bar.write(f"step {step} val PSNR {p:.2f} dB")
        ckpt.snapshot(vae, opt, sched, g, step, hist, t0, force=step == steps)
    bar.close()
    wall = time.time() - t0
    vae.eval()
    if decoder_only:
        vae.register_to_config(scaling_factor=scaling)
    else:  # SD's scaling factor makes latents unit-variance for the UNet.
        with torch.no_grad():
            z = vae.encode(x_all[:2000]).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    save_fp16(vae, out)
    plot_curves(out / f"training_curve_vae{stage}.png",
                {"loss (smoothed)": smooth(hist["loss"])}, "world VAE loss", log_y=True)
    metrics = vae_report(vae, seed)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "n_train": n_train,
            "kl_weight": kl_weight, "scaling_factor": vae.config.scaling_factor,
            "train_wall_s": round(wall, 1), "total_wall_s": round(time.time() - t_start, 1),
            "threads": threads, "metrics": metrics, "val_psnr_curve": hist["val_psnr"],
            "decoder_only": decoder_only, "edge_weight": edge_weight}
    write_json(out / f"training_info_vae{stage}.json", info)
    return info


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical finite differences of two image batches."""
    def grads(x):
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (ax, ay), (bx, by) = grads(a), grads(b)
    return F.l1_loss(ax, bx) + F.l1_loss(ay, by)


def vae_report(vae: AutoencoderKL, seed: int = 0, judge=None) -> dict:
    """PSNR on 1,000 images per split; with a judge, also the judged attributes of 500 single-object
    reconstructions: the ceiling of any sampler decoding through this VAE."""
    res = {}
    for split in ("validation", "heldout"):
        d = generate_arrays(1000, split, seed + 101, use_cache=False)
        res[f"{split}_psnr_db"] = psnr(d["images"], reconstruct(vae, d["images"]))
        if judge is not None:
            one = generate_arrays(500, split, seed + 101, num_objects=1, use_cache=False)
            res[f"{split}_judged_reconstructions"] = judge_single(judge, reconstruct(vae, one["images"]), one["labels"])
    return res


# ----------------------------------------------------------------------------- UNet

def make_unet(cross_attention_dim: int = 128) -> UNet2DConditionModel:
    # 3.2 M parameters: cross-attention at 8x8 and 4x4, a plain 2x2 level and a
    # cross-attention mid block. Narrow where it is wide (8x8) because a CPU step's cost
    # is parameters x positions; measured ~0.7-2 s per batch of 32 on one shared core.
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=32, norm_num_groups=16,
    )


def make_scheduler(kind: str = "ddim"):
    if kind == "ddpm":
        return DDPMScheduler(**SCHEDULE)
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True, steps_offset=0)


@torch.no_grad()
def encode_text(text_encoder, tokenizer, captions: list[str], bs: int = 512) -> torch.Tensor:
    """`last_hidden_state` over 77 tokens, exactly as StableDiffusionPipeline computes it."""
    outs = []
    for i in range(0, len(captions), bs):
        ids = tokenizer(captions[i:i + bs], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        outs.append(text_encoder(ids)[0].to(torch.float16))
    return torch.cat(outs)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, bs: int = 500):
    means, stds = [], []
    for i in range(0, len(images), bs):
        d = vae.encode(to_tensor(images[i:i + bs])).latent_dist
        means.append(d.mean); stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def build_pipeline(unet, vae, clip_dir: str | Path) -> StableDiffusionPipeline:
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(str(clip_dir), dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_dir)), unet=unet,
        scheduler=make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def train_unet(steps: int = 6000, batch_size: int = 32, lr: float = 6e-4, seed: int = 0,
               n_train: int = 20000, threads: int = 1, out_dir: str | Path | None = None,
               resume: bool = True, clip_dir: str | Path | None = None,
               vae_dir: str | Path | None = None, eval_every: int = 1500,
               ema_decay: float = 0.999, max_minutes: float | None = None,
               cooldown_steps: int = 0) -> dict:
    """Train the UNet on frozen CLIP text states and frozen VAE latents.

    Constant learning rate after a 200-step warm-up, with an EMA of the weights: a run cut
    by `max_minutes` (the shared CPU's speed varies 3x) is then the same as a shorter run,
    and `--steps <reached>` reproduces it.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    set_threads(threads)
    seed_everything(seed)
    t_start = time.time()
    clip_dir = Path(clip_dir or asset_path("clip"))
    vae_dir = Path(vae_dir or cache_dir() / "vae")
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    te = CLIPTextModel.from_pretrained(str(clip_dir), dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float32).eval()
    sf = vae.config.scaling_factor
    cache = cache_dir() / f"unet-inputs-s{seed}-n{n_train}.pt"
    if cache.exists():
        inputs = torch.load(cache)
    else:  # text states and latent moments once, not per step
        data = generate_arrays(n_train, "train", seed)
        mean, std = encode_latents(vae, data["images"])
        inputs = {"cond": encode_text(te, tok, data["captions"]), "mean": mean, "std": std,
                  "uncond": encode_text(te, tok, [""])}
        torch.save(inputs, cache)
    unet = make_unet(te.config.hidden_size)
    # An EMA of the weights samples much better than the raw weights of a short run.
    ema = make_unet(te.config.hidden_size)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    noise_sched = make_scheduler("ddpm")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    # Warm-up, constant, then (optionally) a linear cool-down over the last steps: the
    # anneal is what turns a noisy constant-LR run into a sharper model.
    def lr_factor(s: int) -> float:
        cool = 1.0 if not cooldown_steps else min(1.0, max(0.0, (steps - s) / cooldown_steps))
        return min(1.0, (s + 1) / 200) * max(cool, 0.02)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ckpt = Checkpoint(f"unet-s{seed}", every_s=180)
    g = torch.Generator().manual_seed(seed)
    step, hist, elapsed = ckpt.restore(unet, opt, sched, g, {"loss": [], "evals": []}, resume)
    if step and "ema" in hist:
        ema.load_state_dict(hist.pop("ema"))
    t0 = time.time() - elapsed
    bar = progress(steps, step, "unet")
    deadline = time.time() + 60 * max_minutes if max_minutes else float("inf")
    while step < steps and time.time() < deadline:
        unet.train()
        idx = torch.randint(0, len(inputs["cond"]), (batch_size,), generator=g)
        z0 = (inputs["mean"][idx] + inputs["std"][idx] * torch.randn(inputs["mean"][idx].shape, generator=g)) * sf
        cond = inputs["cond"][idx].float()
        drop = torch.rand(batch_size, generator=g) < CFG_DROPOUT
        cond[drop] = inputs["uncond"][0].float()
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        target = noise_sched.get_velocity(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step(); sched.step()
        step += 1
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        hist["loss"].append((step, loss.item()))
        bar.update(1); bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % eval_every == 0:
            pipe = build_pipeline(ema.eval(), vae, clip_dir)
            pipe.set_progress_bar_config(disable=True)
            r = sd_report(pipe, n=64, steps=25, guidance=4.0, seed=seed, splits=("validation",))
            hist["evals"].append((step, r["validation"]))
            bar.write(f"step {step} judged (EMA) {r['validation']}")
        if step % 500 == 0:  # EMA travels inside the checkpoint's history
            hist["ema"] = ema.state_dict()
            ckpt.snapshot(unet, opt, sched, g, step, hist, t0, force=True)
            hist.pop("ema")
    bar.close()
    hist["ema"] = ema.state_dict()
    ckpt.snapshot(unet, opt, sched, g, step, hist, t0, force=True)
    hist.pop("ema")
    wall = time.time() - t0
    out = Path(out_dir or trained_asset_dir("sd"))
    # Reload the VAE: a decoder-only fine-tune may have run while the UNet trained (the
    # encoder, hence the latents, are the same either way).
    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float32).eval()
    pipe = build_pipeline(ema.eval(), vae, clip_dir)
    pipe.to(torch.float16).save_pretrained(str(out))
    pipe.to(torch.float32)
    for f in list(vae_dir.glob("training_info_vae*.json")) + list(vae_dir.glob("training_curve_vae*.png")):
        shutil.copy(f, out / f.name)
    series = {"loss (smoothed)": smooth(hist["loss"], 200)}
    plot_curves(out / "training_curve.png", series, "world UNet v-prediction loss", log_y=True)
    plot_curves(out / "judged_accuracy.png",
                {k: [(s, r[k]) for s, r in hist["evals"]] for k in ("colour", "shape", "position", "size")},
                "judged accuracy during training (100 val captions, 25 steps, cfg 4)")
    info = {"steps": step, "batch_size": batch_size, "lr": lr, "seed": seed, "n_train": n_train,
            "cfg_dropout": CFG_DROPOUT, "ema_decay": ema_decay, "cooldown_steps": cooldown_steps,
            "schedule": SCHEDULE, "train_wall_s": round(wall, 1),
            "total_wall_s": round(time.time() - t_start, 1), "threads": threads,
            "evals": hist["evals"]}
    write_json(out / "training_info.json", info)
    return info


# ----------------------------------------------------------------------------- evaluation

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
    """Judged accuracy of single-object samples against their scenes' labels."""
    return score_readings(read_single_objects(judge, images), [scene_attributes(l) for l in labels])


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
