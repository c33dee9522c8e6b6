"""`gill-hf gill-tiny {prepare,command,train,train-retrieval,train-generation,decision,ship,export}`: the
command line of the GILL-tiny recipe (`gill_hf.world.gill_tiny`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .gill_tiny import (DECISION_PROMPTS, DECISION_TRAIN, DEFAULT_NUM_EVAL, DEFAULT_NUM_TRAIN, GILL_TINY_DIR, export,
                        generation_argv, prepare, prepare_context, retrieval_argv, run_registered_command, ship, train_argv,
                        train_decision, work_dir)
from .context import PHRASINGS


def _cmd_prepare(ns) -> None:
    print(json.dumps(prepare(ns.num_train, ns.num_eval, ns.seed, ns.force), indent=1))


def _train_argv_of(ns) -> list[str]:
    return train_argv(ns.max_steps, ns.output_dir, ns.num_train, ns.num_eval, ns.seed, ns.batch_size, ns.save_steps,
                      ns.eval_steps, ns.backbone_dtype, ns.init, ns.context_ratio, ns.lora_r, ns.learning_rate,
                      ns.context_kind_weights, ns.context_phrasing)


def _cmd_command(ns) -> None:
    argv = _train_argv_of(ns)
    print("gill-hf train " + " ".join(shlex.quote(a) for a in argv))


def _cmd_train(ns) -> None:
    import torch

    from ..train_recipe import train_from_argv

    if ns.threads:
        torch.set_num_threads(ns.threads)
    prepare(ns.num_train, ns.num_eval, ns.seed)
    if ns.context_ratio > 0:
        prepare_context(seed=ns.seed, phrasing=ns.context_phrasing)
    argv = _train_argv_of(ns)
    if ns.resume_from_checkpoint:
        argv += ["--resume_from_checkpoint", ns.resume_from_checkpoint]
    print("[gill-tiny] gill-hf train " + " ".join(shlex.quote(a) for a in argv), flush=True)
    train_from_argv(argv)


def _run_package_command(ns, register, name: str, argv: list[str]) -> None:
    """`gill-hf <name> <argv>` in this process, at `--threads`, echoing the command."""
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    print(f"[gill-tiny] gill-hf {name} " + " ".join(shlex.quote(a) for a in argv), flush=True)
    run_registered_command(register, [name, *argv])


def _cmd_retrieval(ns) -> None:
    from ..retrieval_training import register_retrieval_command

    _run_package_command(ns, register_retrieval_command, "train-retrieval", retrieval_argv(
        ns.checkpoint, ns.output_dir, ns.num_train, ns.num_eval, ns.seed, ns.steps, ns.batch_size, ns.backbone_dtype))


def _cmd_generation(ns) -> None:
    from ..generation_training import register_generation_command

    _run_package_command(ns, register_generation_command, "train-generation", generation_argv(
        ns.checkpoint, ns.output_dir, ns.num_train, ns.num_eval, ns.seed, ns.steps, ns.max_captions, ns.max_context,
        ns.context_phrasing))


def _cmd_decision(ns) -> None:
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    output_dir = ns.output_dir or work_dir() / "decision"
    print(json.dumps(train_decision(ns.model, output_dir, ns.num_prompts, ns.num_train), indent=1))


def _cmd_ship(ns) -> None:
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    extra = json.loads(Path(ns.info).read_text()) if ns.info else None
    print(json.dumps(ship(ns.checkpoint, ns.output_dir, ns.num_prompts, ns.num_train, extra, ns.retrieval_refit,
                          ns.generation_refit), indent=1, default=str))


def _cmd_export(ns) -> None:
    print(export(ns.checkpoint, ns.output_dir))


def context_phrasing_argument(p) -> None:
    p.add_argument("--context-phrasing", default="base", choices=PHRASINGS,
                   help="Training phrasings of the context rows: `base`; `wide` (more ways to say each image "
                        "instruction, world.context.WIDE_PHRASES); or `composed` (also hundreds of composed sayings of "
                        "each image edit, world.context.COMPOSED_PHRASES). Each pool's data folder has its own suffix "
                        "(`_wide`, `_composed`).")


def register(subparsers) -> None:
    """Adds `gill-tiny {prepare,command,train,train-retrieval,train-generation,decision,ship,export}` (for `gill-hf`)."""
    parser = subparsers.add_parser("gill-tiny", help="GILL-tiny on the embedded world: prepare data/targets/init, train, refit retrieval, ship.")
    sub = parser.add_subparsers(dest="gill_tiny_command", required=True)

    def common(p):
        p.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
        p.add_argument("--num-eval", type=int, default=DEFAULT_NUM_EVAL)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("prepare", help="World splits + targets (gill-hf precompute-targets) + initial adapter checkpoint.")
    common(p)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_prepare)
    for name, func in (("command", _cmd_command), ("train", _cmd_train)):
        p = sub.add_parser(name, help="Print / run the gill-hf train command of GILL-tiny.")
        common(p)
        p.add_argument("--max-steps", type=int, default=400)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--save-steps", type=int, default=50)
        p.add_argument("--eval-steps", type=int, default=100)
        p.add_argument("--backbone-dtype", default="bfloat16", choices=["bfloat16", "float32"])
        p.add_argument("--output-dir", default=None)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--resume-from-checkpoint", default=None)
        p.add_argument("--init", default=None, help="Starting checkpoint (default: the fresh heads of `prepare`; the "
                                                    "shipped GILL-tiny folder warm-starts).")
        p.add_argument("--context-ratio", type=float, default=0.0,
                       help="Share of interleaved world context examples (world.context) in the mix (0: captions only).")
        p.add_argument("--context-kind-weights", default=None,
                       help="`kind=weight,...`: draw the context rows of a kind `weight` times as often (e.g. "
                            "`combine=3,edit-colour=2`; kinds not named weigh 1).")
        context_phrasing_argument(p)
        p.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the LM (0: frozen LM, the reference).")
        p.add_argument("--learning-rate", type=float, default=None, help="Peak learning rate (default: the reference's 1e-3).")
        p.set_defaults(func=func)
    p = sub.add_parser("train-retrieval", help="Refit the retrieval projections of a checkpoint at batch 200 "
                                                "(gill-hf train-retrieval on frozen features).")
    common(p)
    p.add_argument("checkpoint")
    p.add_argument("--output-dir", default=None, help="Default: <work>/retrieval.")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--backbone-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_retrieval)
    p = sub.add_parser("train-generation", help="Refit the generation mapper of a checkpoint on frozen [IMG] states "
                                                 "(gill-hf train-generation on caption and context rows).")
    common(p)
    p.add_argument("checkpoint")
    p.add_argument("--output-dir", default=None, help="Default: <work>/generation.")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-captions", type=int, default=8000, help="Caption rows whose states are computed.")
    p.add_argument("--max-context", type=int, default=8000, help="Context rows whose states are computed.")
    context_phrasing_argument(p)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_generation)
    p = sub.add_parser("decision", help="Both decision heads (gill-hf train-decision) on world prompts labelled by "
                                        "whether the scene is in the retrieval set.")
    p.add_argument("--model", default=str(GILL_TINY_DIR))
    p.add_argument("--output-dir", default=None, help="default: ~/.cache/gill_hf_world/gill_tiny/decision")
    p.add_argument("--num-prompts", type=int, default=DECISION_PROMPTS)
    p.add_argument("--num-train", type=int, default=DECISION_TRAIN)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_decision)
    p = sub.add_parser("ship", help="Checkpoint -> decision heads -> the shipped fp16 folder with card and curves.")
    p.add_argument("checkpoint")
    p.add_argument("--output-dir", default=None, help="default: ~/.cache/gill_hf_world/gill_tiny/shipped "
                                                      "(`gill_hf/world/assets/gill_tiny` updates the shipped adapter)")
    p.add_argument("--num-prompts", type=int, default=DECISION_PROMPTS)
    p.add_argument("--num-train", type=int, default=DECISION_TRAIN)
    p.add_argument("--info", default=None, help="JSON file of extra facts for the card (data, wall time, hardware).")
    p.add_argument("--retrieval-refit", default=None, help="The checkpoint's `gill-tiny train-retrieval` output: ship its weights.")
    p.add_argument("--generation-refit", default=None, help="The `gill-tiny train-generation` output of the retrieval "
                                                            "refit (or of the checkpoint): ship its weights.")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_ship)
    p = sub.add_parser("export", help="Checkpoint -> the shipped fp16 adapter folder.")
    p.add_argument("checkpoint")
    p.add_argument("--output-dir", default=None, help="default: ~/.cache/gill_hf_world/gill_tiny/shipped")
    p.set_defaults(func=_cmd_export)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gill_hf.world.gill_tiny_cli")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    ns.func(ns)


if __name__ == "__main__":
    main()
