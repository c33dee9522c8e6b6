"""GILL's checkpoint forms (full and adapter), loading backbones by reference, and verified loads
through the manifest save primitive: the construction and checkpoint methods of
`GillForConditionalGeneration` (a mixin, so the model file stays about the model)."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import cached_file
from transformers.utils import logging as transformers_logging

from .checkpointing import (BACKBONE_PREFIXES, adapter_weights_name, load_adapter_weights, looks_like_a_local_path,
                            save_adapter_weights)
from .configuration_gill import GillConfig
from .lora_gill import load_lora, save_lora_if_present
from .manifest import MANIFEST_NAME, load_consistently, read_manifest, save_folder, verify_folder
from .tokens_gill import add_gill_tokens


def default_form(config) -> str:
    """The form a save takes when none is asked for: adapter whenever every backbone of a GillConfig
    has a reference, else full."""
    references = config.backbone_references or {}
    return "adapter" if all(references.get(name) for name in ("text_model", "vision_model")) else "full"


class GillCheckpointMixin:
    """Construction from backbones, both checkpoint forms, Hub push. Expects the model class to
    define `backbone_resolver`, `hub_pusher` and `rescale_img_rows_`."""

    @classmethod
    def _load_backbones(cls, text_model: Any, vision_model: Any, **load_kwargs) -> tuple[PreTrainedModel, PreTrainedModel]:
        text_source, text_extra = cls.backbone_resolver(text_model)
        vision_source, vision_extra = cls.backbone_resolver(vision_model)
        language_model = AutoModelForCausalLM.from_pretrained(text_source, **text_extra, **load_kwargs)
        vision_config = AutoConfig.from_pretrained(vision_source, **vision_extra)
        if not hasattr(vision_config, "vision_config"):
            return language_model, AutoModel.from_pretrained(vision_source, config=vision_config, **vision_extra, **load_kwargs)
        # A full CLIP checkpoint names a dual-encoder config: load its vision tower only. Its text tower's
        # tensors are expected leftovers (no load report for them); a missing vision tensor is an error.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            vision, info = AutoModel.from_pretrained(vision_source, config=vision_config.vision_config, output_loading_info=True,
                                                     **vision_extra, **load_kwargs)
        finally:
            transformers_logging.set_verbosity(verbosity)
        if info["missing_keys"] or info.get("mismatched_keys"):
            raise ValueError(f"The vision tower at {vision_source!r} lacks or mis-shapes tensors: "
                             f"{sorted(info['missing_keys'])} {info.get('mismatched_keys') or ''}")
        return language_model, vision

    @classmethod
    def from_pretrained_backbones(
        cls, text_model: Any, vision_model: Any, *, tokenizer=None, dtype: torch.dtype | str | None = None, **gill_kwargs
    ) -> "GillCheckpointMixin":
        r"""
        Fresh GILL heads on frozen pretrained backbones.

        Args:
            text_model: a hub id, a local folder or a backbone reference of the causal LM.
            vision_model: the same for the vision tower (a full CLIP checkpoint gives its vision tower).
            tokenizer: the LM's tokenizer; loaded from `text_model` when omitted. `<|image|>` and the
                `[IMG]` tokens are added to it (`add_gill_tokens`), which fixes their ids.
            dtype: dtype of the backbones (the GILL heads stay float32).
            gill_kwargs: any [`GillConfig`] field (`gen_emb_dim`, `ret_emb_dim`, ...).
        """
        language_model, vision = cls._load_backbones(text_model, vision_model, dtype=dtype)
        if tokenizer is None:
            text_source, text_extra = cls.backbone_resolver(text_model)
            tokenizer = AutoTokenizer.from_pretrained(text_source, **text_extra)
        num_img_tokens = gill_kwargs.pop("num_img_tokens", 8)
        image_token_id, img_token_ids = add_gill_tokens(tokenizer, num_img_tokens)
        # Copies: building a composite config resets the attention implementation of the
        # sub-configs it is given, which would silently change how the loaded LM attends.
        config = GillConfig(
            text_config=language_model.config.to_dict(),
            vision_config=vision.config.to_dict(),
            num_img_tokens=num_img_tokens,
            img_token_ids=img_token_ids,
            image_token_id=image_token_id,
            vocab_size=len(tokenizer),
            backbone_references={"text_model": text_model, "vision_model": vision_model},
            **gill_kwargs,
        )
        model = cls(config, language_model=language_model, vision_model=vision)
        model.rescale_img_rows_()
        return model

    #: The form `save_pretrained` writes when none is named (a pipeline's save names the adapter form).
    default_save_form = "full"

    def save_pretrained(self, save_directory: str | os.PathLike, *, form: str | None = None, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None, **kwargs) -> None:
        r"""
        Saves in one of two forms through the manifest primitive (`gill_manifest.json`: each file's
        size and sha256, committed by one rename; files of the folder that this save does not
        write, other than the previous checkpoint's, are never touched; a crash leaves the old
        checkpoint or the new one):

        - `"full"` (the default): the standard self-contained checkpoint (backbones included);
        - `"adapter"`: only GILL's tensors (`gill_adapter.safetensors`) + the config, whose
          `backbone_references` name the backbones that `from_pretrained` loads back.

        `variant` names the weight files as transformers does (`gill_adapter.<variant>.safetensors`);
        `safe_serialization` and `max_shard_size` apply to the full form.
        """
        form = form or self.default_save_form
        if form not in ("full", "adapter"):
            raise ValueError(f"`form` must be 'full' or 'adapter', got {form!r}.")
        modified = getattr(self, "_backbone_modified_by", None)
        if form == "adapter" and modified:
            raise ValueError(f"`form='adapter'` cannot save this model: its LM was changed by `{modified}`, so no backbone "
                             "reference names it any more; save with form='full'.")
        if form == "adapter":
            references = self.config.backbone_references or {}
            missing = [name for name in ("text_model", "vision_model") if not references.get(name)]
            if missing:
                raise ValueError(
                    f"The adapter form needs `config.backbone_references` for {missing}; save with form='full' instead."
                )
        trainable_backbone = [n for n, p in self.named_parameters() if p.requires_grad and n.startswith(BACKBONE_PREFIXES)]
        if form == "full" and trainable_backbone:
            raise ValueError(f"`form='full'` cannot hold LoRA layers ({trainable_backbone[0]}, ...): save with form='adapter' "
                             "(the LoRA tensors go to lora/ in peft's format).")
        with save_folder(save_directory) as staging:
            if form == "full":
                options = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
                super().save_pretrained(staging, safe_serialization=safe_serialization, variant=variant, **options, **kwargs)
            else:
                self.config.save_pretrained(staging)
                save_adapter_weights(self, staging, variant)
                save_lora_if_present(self, staging)  # the LM's LoRA layers, peft's format, in lora/

    def push_to_hub(self, repo_id: str, *, form: str | None = None, api=None, **kwargs) -> Any:
        r"""
        Saves (in `form`: `None` chooses adapter whenever both backbones have references, else
        full), renders the model card from the package's `model_card.md` and uploads once through
        `api` (a `huggingface_hub.HfApi` by default; tests pass a folder-backed fake).
        """
        if self.hub_pusher is None:
            raise RuntimeError("`push_to_hub` is provided by the gill_hf package: `import gill_hf` first.")
        return self.hub_pusher(self, repo_id, form=form, api=api, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, text_model: Any = None, vision_model: Any = None, **kwargs):
        r"""
        Loads either checkpoint form. The adapter form loads its backbones from the references in
        its config (or from `text_model` / `vision_model` when given) through `backbone_resolver`;
        `dtype` and `device_map` apply to the backbones, GILL's heads follow the LM's device.
        A checkpoint missing any GILL or backbone tensor is a `ValueError` naming the keys.

        A folder with a `gill_manifest.json` is verified first (every file's size and sha256; an
        interrupted save is completed) and loaded as one version even while another process saves
        into it; only the files it names belong to the checkpoint.
        """
        if "torch_dtype" in kwargs:  # transformers' older name, honoured as transformers does
            warnings.warn("`torch_dtype` is deprecated; use `dtype`.", FutureWarning, stacklevel=2)
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token", "subfolder") if k in kwargs}

        def load(manifest: dict | None):
            return cls._load_checkpoint(pretrained_model_name_or_path, manifest, model_args, text_model, vision_model, kwargs, hub_kwargs)

        local = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(local):
            return load_consistently(local, load)
        if looks_like_a_local_path(pretrained_model_name_or_path):
            raise ValueError(f"The GILL checkpoint folder {local!r} does not exist.")
        manifest_file = cached_file(pretrained_model_name_or_path, MANIFEST_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if manifest_file is None:
            return load(None)
        snapshot = os.path.dirname(manifest_file)
        for name in read_manifest(snapshot)["files"]:  # fetch what the manifest names, then check it
            cached_file(pretrained_model_name_or_path, name, **hub_kwargs)
        return load(verify_folder(snapshot))

    @classmethod
    def _load_checkpoint(cls, pretrained_model_name_or_path, manifest, model_args, text_model, vision_model, kwargs, hub_kwargs):
        kwargs = dict(kwargs)
        with_info = kwargs.pop("output_loading_info", False)
        adapter_name = adapter_weights_name(kwargs.get("variant"))
        adapter_file = None
        if _in_checkpoint(manifest, adapter_name):
            adapter_file = cached_file(
                pretrained_model_name_or_path, adapter_name, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
        if "config" not in kwargs:
            _check_saved_config(pretrained_model_name_or_path, hub_kwargs)
        if adapter_file is None:
            try:
                model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
            except SafetensorError as error:
                raise ValueError(f"The weights of {str(pretrained_model_name_or_path)!r} cannot be read (damaged file?): {error}") from error
            if info["missing_keys"]:
                raise ValueError(
                    f"The checkpoint at {str(pretrained_model_name_or_path)!r} lacks keys {sorted(info['missing_keys'])}."
                )
            model._own_head_memory()
            model.freeze_backbones()  # loading materialises fresh parameters, which forget requires_grad
            return (model, info) if with_info else model
        config = kwargs.pop("config", None) or GillConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        references = config.backbone_references or {}
        text_model = text_model if text_model is not None else references.get("text_model")
        vision_model = vision_model if vision_model is not None else references.get("vision_model")
        if text_model is None or vision_model is None:
            raise ValueError(f"{adapter_file!r} is an adapter checkpoint but its config names no backbones.")
        text_model, vision_model = (_inside(os.path.dirname(adapter_file), ref) for ref in (text_model, vision_model))
        load_kwargs = {k: kwargs[k] for k in ("dtype", "device_map") if k in kwargs}
        language_model, vision = cls._load_backbones(text_model, vision_model, **load_kwargs)
        _check_backbone_sizes(config, language_model.config, vision.config)
        model = cls(config, language_model=language_model, vision_model=vision)
        load_adapter_weights(model, adapter_file)
        load_lora(model, os.path.dirname(adapter_file))  # lora/ where the folder has one
        model._own_head_memory(device=language_model.get_input_embeddings().weight.device)
        # The adapter loads strictly (any missing, unexpected or mis-shaped key raised above).
        info = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        return (model.eval(), info) if with_info else model.eval()

    @torch.no_grad()
    def _own_head_memory(self, device: torch.device | None = None) -> None:
        """Gives GILL's head tensors fresh (aligned) storage, on `device` if given. Memory-mapped
        safetensors can sit at unaligned addresses, which sends CPU matmuls down other kernels and
        changes results in the last bits; the heads are small, so copying them is cheap."""
        for name, param in self.named_parameters():
            if not name.startswith(("language_model.", "vision_model.")):
                param.data = param.data.to(device=device or param.device, copy=True)


def _inside(folder: str, reference: Any) -> Any:
    """`{"subfolder": name}` names a backbone stored inside the checkpoint's own folder (or Hub repo,
    whose files are in `folder` once fetched), as the remote-code form stores package-data backbones."""
    if not (isinstance(reference, dict) and "subfolder" in reference):
        return reference
    name = reference["subfolder"]
    if set(reference) != {"subfolder"} or not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.split("/"):
        raise ValueError(f"A backbone reference {{'subfolder': ...}} names a relative folder inside the checkpoint, got {reference!r}.")
    return {"path": os.path.join(folder, name)}


def _in_checkpoint(manifest: dict | None, name: str) -> bool:
    """With a manifest, only the files it names belong to the checkpoint (a stale file of another
    save in the same folder is ignored); without one, whatever exists does."""
    return manifest is None or name in manifest["files"]


def _check_saved_config(pretrained_model_name_or_path, hub_kwargs: dict) -> None:
    """A GILL config must name both backbones: GillConfig's defaults (OPT-6.7B + ViT-L/14) would
    otherwise build a 7-billion-parameter model that the checkpoint never described."""
    config_file = cached_file(pretrained_model_name_or_path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if config_file is None:
        raise ValueError(f"{str(pretrained_model_name_or_path)!r} has no config.json: not a GILL checkpoint.")
    try:
        with open(config_file, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_file!r} is not readable JSON: {error}") from error
    missing = [key for key in ("text_config", "vision_config") if not isinstance(saved, dict) or not isinstance(saved.get(key), dict)]
    if missing:
        raise ValueError(f"{config_file!r} lacks {missing}: a GILL config names both backbones' configs.")


def _check_backbone_sizes(config: GillConfig, text_config, vision_config) -> None:
    """Backbones loaded for an adapter must have the sizes the GILL weights were trained on."""
    checks = [
        ("text_model", "hidden_size", config.text_config, text_config),
        ("text_model", "vocab_size", config.text_config, text_config),
        ("text_model", "num_hidden_layers", config.text_config, text_config),
        ("vision_model", "hidden_size", config.vision_config, vision_config),
        ("vision_model", "image_size", config.vision_config, vision_config),
    ]
    for backbone, field, saved, loaded in checks:
        if getattr(saved, field, None) != getattr(loaded, field, None):
            raise ValueError(
                f"The {backbone} backbone has {field}={getattr(loaded, field, None)} but the GILL weights were "
                f"trained on {field}={getattr(saved, field, None)}."
            )


__all__ = ["GillCheckpointMixin", "default_form"]
