"""Checkpoint plumbing shared by the model, the pipeline and the hub helpers: atomic folder writes
and the adapter form (GILL's own tensors + a config that names each backbone)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS_NAME = "gill_adapter.safetensors"
BACKBONE_PREFIXES = ("language_model.", "vision_model.")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `target`; on success it replaces `target`.

    A crash or an exception while writing leaves the previous `target` (or none) in place, never
    a half-written folder at that path.
    """
    target = Path(target).resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"`save_directory` {str(target)!r} exists and is not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(target, backup)
    os.replace(staging, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def gill_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that belong to GILL itself (everything but the two backbones)."""
    return {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith(BACKBONE_PREFIXES)
    }


def save_adapter_weights(model: torch.nn.Module, folder: Path) -> None:
    save_file(gill_state_dict(model), str(folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def load_adapter_weights(model: torch.nn.Module, weights_file: str | os.PathLike) -> None:
    """Loads GILL's tensors strictly: a missing, unexpected or mis-shaped key is a `ValueError`
    naming the file and the key."""
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"Cannot read GILL weights from {str(weights_file)!r}: {error}") from error
    expected: Mapping[str, torch.Tensor] = gill_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{str(weights_file)!r} does not match this GILL model: missing keys {missing}, unexpected keys {unexpected}."
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{str(weights_file)!r}: key {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)} (backbones whose sizes disagree with the GILL weights?)."
            )
    model.load_state_dict(state, strict=False)


__all__ = ["ADAPTER_WEIGHTS_NAME", "atomic_directory", "gill_state_dict", "load_adapter_weights", "save_adapter_weights"]
