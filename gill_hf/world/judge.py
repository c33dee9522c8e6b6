"""The independent attribute judge: a small CNN, used only for evaluation.

It shares nothing with the world CLIP (different architecture, data stream, objective):
for each of the world's five positions it predicts whether an object stands there and,
if so, its shape, colour and size. Objects (up to two) are read off the positions in
reading order. It is trained on clean renders with mild noise, blur and tint so that it
can also judge a decoder's imperfect samples.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tqdm.auto import tqdm

from .common import (Checkpoint, asset_path, plot_curves, progress, save_fp16, seed_everything, set_threads,
                     smooth, to_tensor, trained_asset_dir, write_json)
from .data import generate_arrays, label_ids
from .render import COLOUR_NAMES, POSITIONS, SHAPES, SIZES

HEADS = {"shape": len(SHAPES), "colour": len(COLOUR_NAMES), "size": len(SIZES)}


class WorldJudge(ModelMixin, ConfigMixin):
    """CNN -> per-position (presence, shape, colour, size) logits."""

    @register_to_config
    def __init__(self, width: int = 16, hidden: int = 256):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

        w = width
        self.features = nn.Sequential(
            block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2), block(4 * w, 2 * w, 1),
        )  # 32x32 -> 8x8; the flatten keeps where things are
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 64, hidden), nn.ReLU())
        self.per_pos = 1 + sum(HEADS.values())
        self.head = nn.Linear(hidden, len(POSITIONS) * self.per_pos)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (n,3,32,32) in [-1,1]. Returns logits shaped (n, positions[, classes])."""
        out = self.head(self.mlp(self.features(x))).view(x.shape[0], len(POSITIONS), self.per_pos)
        res = {"present": out[..., 0]}
        i = 1
        for k, c in HEADS.items():
            res[k] = out[..., i:i + c]
            i += c
        return res

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """uint8 (n,32,32,3) -> per-position probabilities of presence and attribute ids."""
        self.eval()
        outs: dict[str, list] = {"present": [], "shape": [], "colour": [], "size": []}
        for i in range(0, len(images), batch_size):
            r = self(to_tensor(images[i:i + batch_size]).to(self.dtype))
            outs["present"].append(torch.sigmoid(r["present"].float()).numpy())
            for k in HEADS:
                outs[k].append(r[k].argmax(-1).numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}

    def describe(self, images: np.ndarray, max_objects: int = 2) -> list[list[dict]]:
        """Objects the judge sees, per image (up to two, in reading order of position)."""
        p = self.predict(images)
        res = []
        for n in range(len(images)):
            ks = [k for k in np.argsort(-p["present"][n])[:max_objects] if p["present"][n, k] > 0.5]
            res.append([{"shape": SHAPES[p["shape"][n, k]], "colour": COLOUR_NAMES[p["colour"][n, k]],
                         "size": SIZES[p["size"][n, k]], "position": POSITIONS[k]}
                        for k in sorted(ks)])
        return res


def load_judge(path: str | Path | None = None) -> WorldJudge:
    """The shipped judge (fp16 on disk) as an fp32 eval-mode model."""
    model = WorldJudge.from_pretrained(str(path or asset_path("judge")))
    return model.float().eval()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild corruption so that the judge also reads a decoder's soft, noisy samples."""
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    soft = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.where(blur, soft, x)
    x = x + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.1  # tint
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.12
    return x.clamp(-1, 1)


def judge_loss(out: dict, y: dict) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(out["present"], y["present"])
    for k in HEADS:
        loss = loss + F.cross_entropy(out[k].reshape(-1, HEADS[k]), y[k].reshape(-1), ignore_index=-100)
    return loss


def evaluate_judge(model: WorldJudge, images: np.ndarray, labels: list[dict]) -> dict[str, float]:
    """Per-attribute accuracy over the true objects; position = the exact set of occupied
    positions is right; 'all' = every attribute of every object and the count are right."""
    p = model.predict(images)
    y = label_ids(labels)
    pred_present = p["present"] > 0.5
    pos_ok = (pred_present == (y["present"] > 0.5)).all(1)
    mask = y["present"] > 0.5
    res = {"position": float(pos_ok.mean())}
    per_img_ok = pos_ok.copy()
    for k in HEADS:
        hit = (p[k] == y[k]) | ~mask
        res[k] = float((p[k] == y[k])[mask].mean())
        per_img_ok &= hit.all(1)
    res["all"] = float(per_img_ok.mean())
    res["n"] = len(images)
    return res


def train_judge(steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                n_train: int = 60000, threads: int = 1, out_dir: str | Path | None = None,
                resume: bool = True) -> dict:
    set_threads(threads)
    seed_everything(seed)
    t_start = time.time()
    data = generate_arrays(n_train, "judge", seed)
    x_all = to_tensor(data["images"])
    y_all = {k: torch.from_numpy(v) for k, v in label_ids(data["labels"]).items()}
    model = WorldJudge()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    ckpt = Checkpoint(f"judge-s{seed}", every_s=60)
    g = torch.Generator().manual_seed(seed)
    step, hist, elapsed = ckpt.restore(model, opt, sched, g, {"loss": [], "val_all": []}, resume)
    val = generate_arrays(1000, "heldout", seed + 1)
    t0 = time.time() - elapsed
    bar = progress(steps, step, "judge")
    while step < steps:
        model.train()
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        out = model(augment(x_all[idx], g))
        loss = judge_loss(out, {k: v[idx] for k, v in y_all.items() if k != "background"})
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        step += 1
        hist["loss"].append((step, loss.item()))
        bar.update(1); bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 250 == 0 or step == steps:
            acc = evaluate_judge(model, val["images"], val["labels"])
            hist["val_all"].append((step, acc["all"]))
            tqdm.write(f"step {step} val {acc}")
        ckpt.snapshot(model, opt, sched, g, step, hist, t0, force=step == steps)
    bar.close()
    wall = time.time() - t0
    out = Path(out_dir or trained_asset_dir("judge"))
    save_fp16(model, out)
    plot_curves(out / "training_curve.png", {"loss (smoothed)": smooth(hist["loss"])},
                "judge training loss", log_y=True)
    metrics = judge_report(model, seed)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "n_train": n_train,
            "train_wall_s": round(wall, 1), "total_wall_s": round(time.time() - t_start, 1),
            "threads": threads, "metrics": metrics}
    write_json(out / "training_info.json", info)
    return info


def judge_report(model: WorldJudge, seed: int = 0) -> dict:
    """Accuracy on 1,000 fresh validation and 1,000 held-out-combination images, split by
    object count (these seeds are not the training stream)."""
    res = {}
    for split in ("validation", "heldout"):
        for n_obj in (1, 2):
            d = generate_arrays(1000, split, seed + 101, num_objects=n_obj, use_cache=False)
            res[f"{split}_{n_obj}obj"] = evaluate_judge(model, d["images"], d["labels"])
    return res
