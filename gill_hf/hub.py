"""Pushing GILL models and pipelines to the Hub: one function that saves, renders the model card
from the package's `model_card.md` and uploads everything in a single commit.

The Hub API object is a parameter (`huggingface_hub.HfApi` by default) so tests can pass a
folder-backed fake. `GillForConditionalGeneration.push_to_hub` reaches `push_to_hub` through the
`hub_pusher` hook that `gill_hf` installs (`modeling/` imports nothing of the package);
`GillPipeline.push_to_hub` calls it directly.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .embedded import SMOLLM2_NAME
from .modeling.checkpoint_forms import default_form

LIBRARY_NAME = "gill-hf"
PIPELINE_TAG = "any-to-any"  # interleaved images and text in; text and images out
BASE_TAGS = ["gill", "gill-hf", "multimodal", "text-to-image", "image-retrieval"]
FORMS = ("full", "adapter")


def choose_form(model, form: str | None) -> str:
    """`form=None` means `default_form(model.config)`."""
    if form is not None:
        if form not in FORMS:
            raise ValueError(f"`form` must be None, 'full' or 'adapter', got {form!r}.")
        return form
    return default_form(model.config)


def _repo_id_of(reference: Any) -> str | None:
    """The Hub id a backbone reference or a component's `_name_or_path` names, if any (local
    paths and embedded artifacts name none)."""
    if isinstance(reference, dict):
        return reference.get("repo_id")
    if isinstance(reference, str) and reference.count("/") == 1 and not os.path.exists(reference):
        return reference
    return None


def base_models(obj) -> list[str]:
    """Hub ids of what a model or pipeline is built on: the GILL model's backbones and, for a
    pipeline, the Stable Diffusion parts."""
    model = getattr(obj, "gill_model", obj)
    found = []
    references = model.config.backbone_references or {}
    candidates = [references.get("text_model"), references.get("vision_model"),
                  getattr(model.language_model.config, "_name_or_path", None),
                  getattr(model.vision_model.config, "_name_or_path", None)]
    for name in ("unet", "vae", "text_encoder"):
        component = getattr(obj, name, None) if obj is not model else None
        config = getattr(component, "config", None)
        candidates.append(getattr(config, "_name_or_path", None))
    for candidate in candidates:
        repo_id = _repo_id_of(candidate)
        if repo_id and repo_id not in found:
            found.append(repo_id)
    return found


def render_model_card(obj, repo_id: str, form: str | None = None, training: dict | None = None,
                      remote_code: bool = False) -> ModelCard:
    """The card of a model or pipeline, rendered from `model_card.md` (package data) with
    `library_name`, `pipeline_tag`, base models and tags in its metadata. `training` (`data`,
    `steps`, `metrics`) fills the card's training section from a run; `remote_code` adds the usage
    without gill-hf and the Hub's `custom_code` tag."""
    is_pipeline = hasattr(obj, "gill_model")
    model = getattr(obj, "gill_model", obj)
    tags = BASE_TAGS + (["diffusers", "pipeline"] if is_pipeline else [f"{form or 'full'}-checkpoint"])
    if remote_code:
        tags.append("custom_code")
    if is_pipeline and getattr(obj, "retrieval_index", None) is not None:
        tags.append("retrieval-index")
    card_data = ModelCardData(
        library_name=LIBRARY_NAME, pipeline_tag=PIPELINE_TAG, base_model=base_models(obj) or None, tags=tags,
    )
    references = model.config.backbone_references or {}
    unet = getattr(obj, "unet", None) if is_pipeline else None
    template = resources.files("gill_hf").joinpath("model_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data, template_str=template, model_name=repo_id.split("/")[-1], repo_id=repo_id,
        kind="pipeline" if is_pipeline else "model",
        form=form or f"{default_form(model.config)} (the pipeline's `gill_model`)",
        text_model=_describe(references.get("text_model"), model.language_model),
        vision_model=_describe(references.get("vision_model"), model.vision_model),
        image_decoder=getattr(getattr(unet, "config", None), "_name_or_path", None) or (type(unet).__name__ if unet is not None else None),
        num_gill_parameters=f"{sum(p.numel() for n, p in model.named_parameters() if not n.startswith(('language_model.', 'vision_model.'))):,}",
        training={"data": None, "steps": None, "metrics": {}, **training} if training else None, remote_code=remote_code,
        embedded_smollm2=(references.get("text_model") or {}).get("embedded") == SMOLLM2_NAME,
    )


def _describe(reference: Any, module) -> str:
    """A backbone as the card names it: its reference (hub id, folder or embedded artifact) and class."""
    if isinstance(reference, dict):
        reference = reference.get("repo_id") or reference.get("embedded") or reference.get("path")
    return f"`{reference}` ({type(module).__name__})" if reference else type(module).__name__


def push_to_hub(
    obj,
    repo_id: str,
    *,
    api=None,
    form: str | None = None,
    processor=None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    training: dict | None = None,
    embed_images: bool = False,
    remote_code: bool = False,
) -> Any:
    r"""
    Saves `obj` (a [`GillForConditionalGeneration`] or a [`GillPipeline`]) to a temporary folder,
    writes its rendered `README.md` and uploads the folder in one commit.

    Args:
        obj: the model or the pipeline.
        repo_id (`str`): `"org/name"`; created if missing.
        api: a `huggingface_hub.HfApi`-like object (`create_repo`, `upload_folder`); `HfApi(token=token)` by default.
        form (`str`, *optional*): model only: `"full"`, `"adapter"` or None (adapter whenever every
            backbone has a reference).
        processor ([`GillProcessor`], *optional*): model only: saved beside the weights.
        commit_message, private, token, revision: as for `HfApi.upload_folder` / `create_repo`.
        training (`dict`, *optional*): `data`, `steps`, `metrics` of the run, for the card.
        embed_images (`bool`, *optional*): pipeline only: a retrieval index over local image files is
            pushed with the images' bytes (a dataset-backed copy); without it such an index is refused
            (the repo would name files that only exist on this machine).
        remote_code (`bool`, *optional*): the remote-code form (`gill_hf.remote_code`), which plain
            `transformers` (a model; needs `processor`) or `diffusers` (a `GillPipeline`) loads with
            `trust_remote_code=True`.

    Returns:
        What `api.upload_folder` returns (the commit info for `HfApi`).
    """
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"`repo_id` must be a non-empty str, got {repo_id!r}.")
    is_pipeline = hasattr(obj, "gill_model")
    if is_pipeline and (form is not None or processor is not None):
        raise ValueError("`form` and `processor` apply to a model; a pipeline saves all its components.")
    if remote_code and not is_pipeline and (processor is None or form == "full"):
        raise ValueError("`remote_code=True` saves the adapter form with the processor: pass `processor` (and no `form='full'`).")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    form = None if is_pipeline else choose_form(obj, form)
    index = getattr(obj, "retrieval_index", None) if is_pipeline else None
    local = index.local_references() if index is not None else []
    if local and not embed_images:
        raise ValueError(f"The pipeline's retrieval index refers to {len(local)} local image files (e.g. {local[0]!r}) that "
                         "the Hub repo would not hold: pass `embed_images=True` to upload the images with it, or build the "
                         "index from a `datasets.Dataset` or URLs.")
    with tempfile.TemporaryDirectory(prefix="gill-hf-push-") as tmp:
        folder = Path(tmp) / "upload"
        if is_pipeline:
            save = type(obj).save_pretrained
            if remote_code:
                from .remote_code import save_pipeline_remote_code_form as save
            if local:
                obj.register_modules(retrieval_index=index.with_embedded_images())
            try:
                save(obj, folder)
            finally:
                obj.register_modules(retrieval_index=index)
        elif remote_code:
            from .remote_code import save_remote_code_form

            save_remote_code_form(obj, processor, folder)
        else:
            obj.save_pretrained(folder, form=form)
            if processor is not None:
                processor.save_pretrained(folder)
        render_model_card(obj, repo_id, form, training, remote_code).save(folder / "README.md")
        api.create_repo(repo_id=repo_id, exist_ok=True, private=private, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
            commit_message=commit_message or f"Upload GILL {'pipeline' if is_pipeline else f'model ({form} form)'}",
        )


__all__ = ["base_models", "choose_form", "push_to_hub", "render_model_card"]
