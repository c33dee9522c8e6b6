"""Checkpoint plumbing shared by the model, the pipeline and the hub helpers: the adapter form
(GILL's own tensors + a config that names each backbone). Every save goes through the manifest
primitive of `manifest.py`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS_NAME = "gill_adapter.safetensors"
BACKBONE_PREFIXES = ("language_model.", "vision_model.")


def looks_like_a_local_path(name: str | os.PathLike) -> bool:
    """Hub ids are `name` or `org/name`; anything else (absolute, `./x`, `~/x`, deeper) names a local
    path, which must not silently become a hub lookup when it does not exist."""
    text = os.fspath(name)
    return os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def gill_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that belong to GILL itself (everything but the two backbones)."""
    return {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith(BACKBONE_PREFIXES)
    }


def adapter_weights_name(variant: str | None = None) -> str:
    """`gill_adapter.safetensors`, or `gill_adapter.<variant>.safetensors` (transformers' variant naming)."""
    return ADAPTER_WEIGHTS_NAME if not variant else ADAPTER_WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")


def save_adapter_weights(model: torch.nn.Module, folder: str | os.PathLike, variant: str | None = None) -> None:
    save_file(gill_state_dict(model), os.path.join(folder, adapter_weights_name(variant)), metadata={"format": "pt"})


def load_adapter_weights(model: torch.nn.Module, weights_file: str | os.PathLike) -> None:
    """Loads GILL's tensors strictly: a missing, unexpected or mis-shaped key is a `ValueError`
    naming the file and the key."""
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, MemoryError, OverflowError) as error:
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


__all__ = ["ADAPTER_WEIGHTS_NAME", "BACKBONE_PREFIXES", "adapter_weights_name", "looks_like_a_local_path", "gill_state_dict", "load_adapter_weights", "save_adapter_weights"]
