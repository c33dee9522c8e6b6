"""Command-line entry points of the embedded world (`python -m gill_hf.world <command>`).

`register_world_commands(subparsers)` adds them to any argparse subparsers object, so the
package's main CLI can hang them under `gill-hf world ...`. Imports of torch-heavy modules
happen inside the handlers to keep `--help` fast.
"""

from __future__ import annotations

import argparse


def _generate(a: argparse.Namespace) -> None:
    from .data import generate_dataset

    for split, n in (("train", a.n_train), ("validation", a.n_val), ("heldout", a.n_heldout)):
        ds = generate_dataset(n, split, a.seed)
        path = f"{a.output_dir}/{split}.parquet"
        ds.to_parquet(path)
        print(f"wrote {len(ds)} rows to {path}")


def _train_judge(a: argparse.Namespace) -> None:
    from .judge import train_judge

    info = train_judge(steps=a.steps, seed=a.seed, threads=a.threads, out_dir=a.output_dir,
                       resume=not a.no_resume)
    print(info)


def _train_clip(a: argparse.Namespace) -> None:
    from .clip import train_clip

    print(train_clip(steps=a.steps, seed=a.seed, threads=a.threads, out_dir=a.output_dir,
                     resume=not a.no_resume))


def _train_vae(a: argparse.Namespace) -> None:
    from .sd import train_vae

    print(train_vae(steps=a.steps, seed=a.seed, threads=a.threads, out_dir=a.output_dir,
                    resume=not a.no_resume, decoder_only=a.decoder_only, lr=a.lr,
                    edge_weight=a.edge_weight))


def _train_unet(a: argparse.Namespace) -> None:
    from .sd import train_unet

    print(train_unet(steps=a.steps, seed=a.seed, threads=a.threads, out_dir=a.output_dir,
                     resume=not a.no_resume, clip_dir=a.clip_dir, vae_dir=a.vae_dir,
                     max_minutes=a.max_minutes, cooldown_steps=a.cooldown_steps))


def _export_vist(a: argparse.Namespace) -> None:
    from .vist_export import export_world_vist

    print(export_world_vist(a.output_dir, a.num_stories, a.split, a.seed))


def _evaluate(a: argparse.Namespace) -> None:
    from .evaluate import evaluate_all

    print(evaluate_all(a.which, seed=a.seed, threads=a.threads, update_cards=a.update_cards))


def _common(p: argparse.ArgumentParser, steps: int | None = None) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the cores are shared)")
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--output-dir", default=None,
                       help="default: ~/.cache/gill_hf_world/assets/<model> (`gill_hf/world/assets/<model>` updates the shipped one)")
        p.add_argument("--no-resume", action="store_true", help="ignore a cached checkpoint")


def register_world_commands(subparsers) -> None:
    """Add the world's commands to an argparse `subparsers` object."""
    p = subparsers.add_parser("generate", help="write train/validation/heldout splits as parquet")
    _common(p)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--n-heldout", type=int, default=2000)
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("train-judge", help="train the attribute judge (CNN)")
    _common(p, steps=1500)
    p.set_defaults(func=_train_judge)

    p = subparsers.add_parser("train-clip", help="train the world CLIP (tokenizer + CLIPModel)")
    _common(p, steps=1200)
    p.set_defaults(func=_train_clip)

    p = subparsers.add_parser("train-vae", help="train the world SD's AutoencoderKL")
    _common(p, steps=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--decoder-only", action="store_true",
                   help="continue a trained VAE with the encoder frozen (latents unchanged)")
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="weight of an L1 loss on image gradients (sharper shape corners)")
    p.set_defaults(func=_train_vae)

    p = subparsers.add_parser("train-unet", help="train the world SD's UNet (needs clip + vae)")
    _common(p, steps=6000)
    p.add_argument("--clip-dir", default=None)
    p.add_argument("--vae-dir", default=None)
    p.add_argument("--cooldown-steps", type=int, default=0,
                   help="linear learning-rate decay over the last N of --steps")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (and save) after this much wall time; the card records the steps")
    p.set_defaults(func=_train_unet)

    p = subparsers.add_parser("export-vist", help="world stories as a VIST dataset (SIS json + images) for `gill-hf eval vist`")
    p.add_argument("output_dir")
    p.add_argument("--num-stories", type=int, default=200)
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_export_vist)

    p = subparsers.add_parser("evaluate", help="measure the shipped models' acceptance metrics")
    _common(p)
    p.add_argument("which", nargs="*", default=["judge", "clip", "vae", "sd"], choices=["judge", "clip", "vae", "sd"],
                   help="which models to measure (default: all four)")
    p.add_argument("--update-cards", action="store_true")
    p.set_defaults(func=_evaluate)
