"""LoRA layers on GILL's language model, stored in peft's own format beside GILL's weights.

A checkpoint's `lora/` folder holds `adapter_config.json` and `adapter_model.safetensors` exactly as
peft writes them for the LM, so `PeftModel.from_pretrained(lm, "<checkpoint>/lora")` reads it. The
layers are injected in place (module names unchanged), so GILL's adapter form keeps its keys.
Checkpoints of the earlier layout (`lora/backbone_trainable.safetensors`, GILL's parameter names)
still load. This module is part of the model code (every adapter-form load and save goes through
it), so a remote-code folder carries it and loads `lora/` without `gill_hf`; peft is imported only
where a folder holds LoRA layers.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

LORA_FOLDER = "lora"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "backbone_trainable.safetensors"
_LM_PREFIX = "language_model."
_PEFT_PREFIX = "base_model.model."


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | str | None = None):
    """Injects LoRA layers into the (frozen) LM in place with peft; only the LoRA tensors become
    trainable. Returns the `LoraConfig`. The LM stays in eval mode under `model.train()`, so LoRA
    dropout is inactive."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or ["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    inject_adapter_in_model(config, model.language_model)
    model.lora_config = config
    return config


def has_lora(model) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def peft_state_dict(model) -> dict[str, torch.Tensor]:
    """The LM's LoRA tensors under peft's saved names (`base_model.model.<module>.lora_A.weight`)."""
    state = {}
    for name, param in model.named_parameters():
        if ".lora_" in name and name.startswith(_LM_PREFIX):
            key = _PEFT_PREFIX + name[len(_LM_PREFIX):].replace(".default.", ".")
            state[key] = param.detach().contiguous()
    return state


def save_lora(model, folder: str | os.PathLike) -> None:
    """Writes `<folder>/lora/adapter_config.json` + `adapter_model.safetensors` (peft's format)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("The model holds LoRA tensors but no `lora_config` (inject them with `apply_lora`).")
    target = os.path.join(folder, LORA_FOLDER)
    os.makedirs(target, exist_ok=True)
    # the LM's reference where it is a name or path (an embedded backbone's cache path means nothing elsewhere)
    reference = (getattr(model.config, "backbone_references", None) or {}).get("text_model")
    config.base_model_name_or_path = reference if isinstance(reference, str) else (
        None if reference else getattr(model.language_model.config, "_name_or_path", None))
    config.save_pretrained(target)
    save_file(peft_state_dict(model), os.path.join(target, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


def load_lora(model, folder: str | os.PathLike) -> bool:
    """If `folder` holds a `lora/` adapter, injects the same LoRA layers into `model`'s LM and loads
    their tensors strictly (peft's format, or the earlier layout). Returns whether it did."""
    lora_dir = os.path.join(folder, LORA_FOLDER)
    if not os.path.isfile(os.path.join(lora_dir, "adapter_config.json")):
        return False
    from peft import LoraConfig
    config = LoraConfig.from_pretrained(lora_dir)
    if not has_lora(model):
        apply_lora(model, config.r, config.lora_alpha, config.lora_dropout, sorted(config.target_modules))
    expected = {name for name, _ in model.named_parameters() if ".lora_" in name}
    peft_file, legacy_file = os.path.join(lora_dir, PEFT_WEIGHTS_NAME), os.path.join(lora_dir, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(peft_file):
        state = {_LM_PREFIX + key[len(_PEFT_PREFIX):].replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): value
                 for key, value in load_file(peft_file).items()}
    elif os.path.isfile(legacy_file):
        state = load_file(legacy_file)
    else:
        raise ValueError(f"{lora_dir!r} has an adapter_config.json but no {PEFT_WEIGHTS_NAME}.")
    if set(state) != expected:
        raise ValueError(f"{lora_dir!r} does not match the model's LoRA layers: missing {sorted(expected - set(state))[:4]}, "
                         f"unexpected {sorted(set(state) - expected)[:4]}.")
    model.load_state_dict(state, strict=False)
    return True


def save_lora_if_present(model, folder: str | os.PathLike) -> None:
    """`save_lora` when the model holds LoRA layers (every adapter-form save calls this)."""
    if has_lora(model):
        save_lora(model, folder)


__all__ = ["LORA_FOLDER", "apply_lora", "has_lora", "load_lora", "peft_state_dict", "save_lora", "save_lora_if_present"]
