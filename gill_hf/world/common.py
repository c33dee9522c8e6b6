"""Small shared helpers for the world's training commands: threads, checkpoints, curves."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import cache_dir

ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(name: str) -> Path:
    """Folder of a shipped model: 'clip', 'sd' or 'judge'."""
    return ASSETS / name


def trained_asset_dir(name: str) -> Path:
    """Where a world training run writes its model by default: the user's world cache, never the
    installed package (pass `--output-dir gill_hf/world/assets/<name>` to update the shipped one)."""
    return cache_dir() / "assets" / name


def set_threads(n: int) -> None:
    # The machine's two cores are shared; long runs default to one thread.
    torch.set_num_threads(max(1, int(n)))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n,h,w,3) -> float (n,3,h,w) in [-1, 1], the range SD's VAE uses."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class Checkpoint:
    """A resumable training state in the cache dir (never in the repo).

    Saved atomically every `every` seconds, so a killed run loses at most that much work.
    """

    def __init__(self, name: str, every_s: float = 120.0):
        self.dir = cache_dir() / "runs" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.pt"
        self.every_s = every_s
        self._last = time.time()

    def load(self) -> dict | None:
        if self.path.exists():
            return torch.load(self.path, map_location="cpu", weights_only=False)
        return None

    def restore(self, model, opt, sched, gen: torch.Generator, hist: dict,
                enabled: bool = True) -> tuple[int, dict, float]:
        """Load the saved state into model/optimizer/scheduler/generator, if any.

        Returns (step, history, elapsed seconds) to continue from.
        """
        state = self.load() if enabled else None
        if not state:
            return 0, hist, 0.0
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"]); gen.set_state(state["gen"])
        print(f"resumed {self.dir.name} at step {state['step']}")
        return state["step"], state["hist"], state["elapsed"]

    def snapshot(self, model, opt, sched, gen: torch.Generator, step: int, hist: dict,
                 t0: float, force: bool = False) -> None:
        self.save({"model": model.state_dict(), "opt": opt.state_dict(),
                   "sched": sched.state_dict(), "gen": gen.get_state(), "step": step,
                   "hist": hist, "elapsed": time.time() - t0}, force=force)

    def save(self, state: dict, force: bool = False) -> None:
        if not force and time.time() - self._last < self.every_s:
            return
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self._last = time.time()


def plot_curves(path: Path | str, series: dict[str, list[tuple[float, float]]],
                title: str, log_y: bool = False) -> None:
    """A training-curve PNG drawn with PIL (no matplotlib here): one line per series."""
    w, h, m = 640, 360, 48
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for s in series.values() for x, y in s if np.isfinite(y)]
    if not pts:
        img.save(path)
        return
    tf = (lambda v: np.log10(max(v, 1e-8))) if log_y else (lambda v: v)
    xs = [p[0] for p in pts]
    ys = [tf(p[1]) for p in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1e-9)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-9)
    sx = lambda v: m + (v - x0) / (x1 - x0) * (w - 2 * m)  # noqa: E731
    sy = lambda v: h - m - (tf(v) - y0) / (y1 - y0) * (h - 2 * m)  # noqa: E731
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, 12), title, fill="black")
    d.text((4, m - 4), f"{(10 ** y1 if log_y else y1):.4g}", fill="black")
    d.text((4, h - m - 6), f"{(10 ** y0 if log_y else y0):.4g}", fill="black")
    d.text((m, h - m + 6), f"{x0:.0f}", fill="black")
    d.text((w - m - 30, h - m + 6), f"{x1:.0f}", fill="black")
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    for i, (name, s) in enumerate(series.items()):
        c = palette[i % len(palette)]
        s = [(x, y) for x, y in s if np.isfinite(y)]
        if len(s) > 1:
            d.line([(sx(x), sy(y)) for x, y in s], fill=c, width=2)
        elif s:
            d.ellipse([sx(s[0][0]) - 2, sy(s[0][1]) - 2, sx(s[0][0]) + 2, sy(s[0][1]) + 2], fill=c)
        d.text((w - m - 150, m + 6 + 14 * i), name, fill=c)
    img.save(path)


def smooth(values: list[tuple[float, float]], k: int = 50) -> list[tuple[float, float]]:
    """Running mean over k points, for readable loss curves."""
    if len(values) < 2:
        return values
    ys = np.array([v[1] for v in values], dtype=np.float64)
    c = np.cumsum(np.insert(ys, 0, 0.0))
    out = []
    for i, (x, _) in enumerate(values):
        lo = max(0, i - k + 1)
        out.append((x, float((c[i + 1] - c[lo]) / (i + 1 - lo))))
    return out


def save_fp16(model, out: Path) -> None:
    """Saves `model` in fp16 (the shipped weights) into `out`, then returns it to fp32 in eval mode."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(torch.float16).save_pretrained(str(out))
    model.float()


def write_json(path: Path | str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def progress(total: int, initial: int = 0, desc: str = ""):
    """A tqdm bar; in a log file (not a terminal) it writes a line every 20 s, not a flood."""
    import sys

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, mininterval=0.1 if tty else 20.0,
                dynamic_ncols=tty, ascii=not tty)
