"""World CLIP: a small `transformers.CLIPModel` with its own BPE tokenizer, trained
contrastively on the world's image-caption pairs.

The folder it writes is a standard one: `CLIPModel.from_pretrained`,
`CLIPProcessor.from_pretrained` and `CLIPTokenizer.from_pretrained` load it. Its text
encoder is also the world Stable Diffusion's text encoder (conditioning on
`last_hidden_state`, 77 tokens), as CLIP ViT-L's is for SD 1.x.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                          CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig)

from .common import (Checkpoint, asset_path, plot_curves, progress, save_fp16, seed_everything, set_threads,
                     smooth, to_tensor, trained_asset_dir, write_json)
from .data import generate_arrays
from .render import (BACKGROUND_NAMES, COLOUR_NAMES, IMAGE_SIZE, POSITIONS, SHAPES, SIZES,
                     canonical_caption)

MAX_LEN = 77  # as SD's CLIP text encoder, so pipelines pad prompts to the same length
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_tokenizer(captions: list[str], vocab_size: int = 600) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges are learned from the world's captions.

    The alphabet line makes sure any lowercase ASCII prompt tokenizes without <unk>.
    """
    base = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[], unk_token=EOS, bos_token=BOS,
                         eos_token=EOS, pad_token=EOS)
    alphabet = "abcdefghijklmnopqrstuvwxyz 0123456789 . , : ; ! ? ' - ( ) /"
    tok = base.train_new_from_iterator(itertools.chain([alphabet], captions), vocab_size=vocab_size)
    tok.model_max_length = MAX_LEN
    return tok


def make_config(tok: CLIPTokenizer, hidden: int = 128, text_layers: int = 3,
                vision_layers: int = 4, patch_size: int = 8) -> CLIPConfig:
    # Patch 8 (16 patches + CLS) and 3 text layers: measured 0.7 s per batch of 128 on one
    # core, against 3 s for patch 4 / 4 layers; the world needs no finer patches.
    text = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=MAX_LEN,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=hidden,
    )
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=patch_size, hidden_size=hidden,
        intermediate_size=4 * hidden, num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=hidden,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=hidden)


def make_processor(tok: CLIPTokenizer) -> CLIPProcessor:
    # mean/std 0.5 map pixels to [-1, 1]; 32 px in, no resizing of world images.
    ip = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=ip, tokenizer=tok)


def tokenize(tok: CLIPTokenizer, texts: list[str], max_length: int = MAX_LEN) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=max_length, truncation=True,
               return_tensors="pt").input_ids


def train_clip(steps: int = 1200, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
               n_train: int = 100000, threads: int = 1, out_dir: str | Path | None = None,
               resume: bool = True) -> dict:
    set_threads(threads)
    seed_everything(seed)
    t_start = time.time()
    data = generate_arrays(n_train, "train", seed)
    tok = train_tokenizer(data["captions"])
    # Captions are short (<= 25 tokens); training on 28 positions is exact for the
    # EOS-pooled embedding (the causal mask hides later padding) and far cheaper than 77.
    ids_all = tokenize(tok, data["captions"], max_length=28)
    x_all = to_tensor(data["images"])
    model = CLIPModel(make_config(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    ckpt = Checkpoint(f"clip-s{seed}", every_s=120)
    g = torch.Generator().manual_seed(seed)
    hist = {"loss": [], "val_colour": [], "val_shape": []}
    step, hist, elapsed = ckpt.restore(model, opt, sched, g, hist, resume)
    val = generate_arrays(500, "validation", seed + 1, num_objects=1)
    t0 = time.time() - elapsed
    bar = progress(steps, step, "clip")
    while step < steps:
        model.train()
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        out = model(input_ids=ids_all[idx], pixel_values=x_all[idx])
        target = torch.arange(batch_size)
        loss = (F.cross_entropy(out.logits_per_image, target)
                + F.cross_entropy(out.logits_per_text, target)) / 2
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        step += 1
        hist["loss"].append((step, loss.item()))
        bar.update(1); bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 500 == 0 or step == steps:
            acc = zero_shot(model, tok, val["images"], val["labels"])
            hist["val_colour"].append((step, acc["colour"])); hist["val_shape"].append((step, acc["shape"]))
            tqdm.write(f"step {step} zero-shot {acc}")
        ckpt.snapshot(model, opt, sched, g, step, hist, t0, force=step == steps)
    bar.close()
    wall = time.time() - t0
    out = Path(out_dir or trained_asset_dir("clip"))
    save_fp16(model, out)
    make_processor(tok).save_pretrained(str(out))
    plot_curves(out / "training_curve.png", {"loss (smoothed)": smooth(hist["loss"])},
                "world CLIP contrastive loss", log_y=True)
    metrics = clip_report(model, tok, seed)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "n_train": n_train,
            "train_wall_s": round(wall, 1), "total_wall_s": round(time.time() - t_start, 1),
            "threads": threads, "metrics": metrics}
    write_json(out / "training_info.json", info)
    return info


def prompt_grid() -> tuple[list[str], list[dict]]:
    """One canonical caption per single-object attribute combination (1,200 prompts)."""
    prompts, attrs = [], []
    for sh, co, si, po, bg in itertools.product(SHAPES, COLOUR_NAMES, SIZES, POSITIONS, BACKGROUND_NAMES):
        prompts.append(canonical_caption(sh, co, si, po, bg))
        attrs.append({"shape": sh, "colour": co, "size": si, "position": po, "background": bg})
    return prompts, attrs


@torch.no_grad()
def zero_shot(model: CLIPModel, tok: CLIPTokenizer, images: np.ndarray, labels: list[dict]) -> dict:
    """Zero-shot attribute classification of single-object images by text prompts.

    Each image is scored against the full grid of canonical prompts; an attribute's
    prediction is the value with the largest summed probability over the other attributes.
    """
    model.eval()
    prompts, attrs = prompt_grid()
    t = model.get_text_features(input_ids=tokenize(tok, prompts)).pooler_output
    t = F.normalize(t.float(), dim=-1)
    probs = []
    for i in range(0, len(images), 256):
        v = model.get_image_features(pixel_values=to_tensor(images[i:i + 256]).to(model.dtype))
        v = F.normalize(v.pooler_output.float(), dim=-1)
        probs.append(torch.softmax(100.0 * v @ t.T, dim=-1))
    p = torch.cat(probs)
    res = {}
    vocab = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITIONS,
             "background": BACKGROUND_NAMES}
    for k, values in vocab.items():
        onehot = torch.tensor([[float(a[k] == v) for v in values] for a in attrs])
        pred = (p @ onehot).argmax(-1).numpy()
        truth = np.array([values.index(l[k + "s"][0] if k != "background" else l[k]) for l in labels])
        res[k] = float((pred == truth).mean())
    return res


def clip_report(model: CLIPModel, tok: CLIPTokenizer, seed: int = 0) -> dict:
    res = {}
    for split in ("validation", "heldout"):
        d = generate_arrays(1000, split, seed + 101, num_objects=1, use_cache=False)
        res[f"{split}_1obj"] = zero_shot(model, tok, d["images"], d["labels"])
    return res


def load_clip(path: str | Path | None = None) -> tuple[CLIPModel, CLIPProcessor]:
    path = str(path or asset_path("clip"))
    return CLIPModel.from_pretrained(path, dtype=torch.float32).eval(), CLIPProcessor.from_pretrained(path)
