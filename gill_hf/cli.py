"""The `gill-hf` command. Each module that offers commands has a `register(subparsers)`-style
function; this file only wires them together. Every command sets `func(namespace)`.

    gill-hf train --model_name_or_path ... --train_tsv ... --image_dir ... --output_dir ... [any TrainingArguments flag]
    gill-hf train-retrieval --model_name_or_path ... --dataset_name ... --output_dir ...
    gill-hf train-generation --model_name_or_path ... --dataset_name ... --interleaved_dataset_name ... --output_dir ...
    gill-hf train-decision --model_name_or_path ... --prompts prompts.tsv --output_dir ...
    gill-hf convert-original ORIGINAL_DIR OUTPUT_DIR --text-model ... --vision-model ...
    gill-hf demo --output-dir out/demo
    gill-hf eval-world
    gill-hf eval {vist,visdial} DATA_DIR --clip CLIP --output-dir OUT
    gill-hf gill-tiny {prepare,command,train,train-retrieval,train-generation,decision,ship,export}
    gill-hf world {generate,train-judge,train-clip,train-vae,train-unet,evaluate}
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that add commands: (module, function, group). A group nests the module's commands under
# one word (`gill-hf world generate ...`); None adds them at the top level.
COMMAND_MODULES = (
    ("gill_hf.world.cli", "register_world_commands", "world"),
    ("gill_hf.eval_vist", "register", "eval"),
    ("gill_hf.eval_visdial", "register", "eval"),
    ("gill_hf.world.gill_tiny_cli", "register", None),
    ("gill_hf.world.eval_gill", "register", None),
    ("gill_hf.demo", "register", None),
    ("gill_hf.serve", "register", None),
    ("gill_hf.convert_original", "register", None),
)


def _train(namespace: argparse.Namespace) -> None:
    from .train_recipe import train_from_argv

    trainer = train_from_argv(namespace.extra_args)
    # Under `accelerate launch`: every process done, then the process group torn down before exit. Left to
    # interpreter shutdown, gloo's threads now and then abort a process that had finished its work
    # ("terminate called without an active exception"), failing the launch.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def register_train_command(subparsers) -> None:
    train = subparsers.add_parser(
        "train", add_help=False, help="Train GILL with GillTrainer (HfArgumentParser: model, data and every TrainingArguments flag; "
                                      "`gill-hf train --help` lists them).",
    )
    # Every flag goes to HfArgumentParser (`main` hands over what argparse does not know).
    train.set_defaults(func=_train, passthrough=True)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class GillArgumentParser(argparse.ArgumentParser):
    """Every `--flag_name` is also `--flag-name` (and the other way round), as `HfArgumentParser`
    accepts both; `--help` shows each flag's default. Subcommand parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        spelled = list(names)
        for name in names:
            if name.startswith("--"):
                other = "--" + (name[2:].replace("_", "-") if "_" in name else name[2:].replace("-", "_"))
                if other not in spelled and other not in self._option_string_actions:
                    spelled.append(other)
        return super().add_argument(*spelled, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = GillArgumentParser(prog="gill-hf", description="GILL on Hugging Face libraries.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_train_command(subparsers)
    from .data import register_data_commands
    from .decision import register_decision_command
    from .generation_training import register_generation_command
    from .retrieval_training import register_retrieval_command

    register_decision_command(subparsers)
    register_retrieval_command(subparsers)
    register_generation_command(subparsers)
    register_data_commands(subparsers)
    groups: dict[str, argparse._SubParsersAction] = {}
    for module_name, function_name, group in COMMAND_MODULES:
        register = getattr(importlib.import_module(module_name), function_name)
        if group is None:
            register(subparsers)
            continue
        if group not in groups:  # one nested parser per group, shared by its modules
            nested = subparsers.add_parser(group, help=f"{group} commands.")
            groups[group] = nested.add_subparsers(dest=f"{group}_command", required=True)
        register(groups[group])
    return parser


# What a user can cause (a missing folder, a bad value, bad data): one `error:` line, exit status 2,
# as argparse does for its own errors. GILL_HF_TRACEBACK=1 shows the traceback instead.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)


def run_command(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
    try:
        namespace.func(namespace)
    except USER_ERRORS as error:
        if os.environ.get("GILL_HF_TRACEBACK"):
            raise
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    namespace, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and not getattr(namespace, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    namespace.extra_args = extra
    run_command(parser, namespace)


if __name__ == "__main__":
    main()
