"""Small helpers of GillPipeline: image conversion, SD text encoding, aligned storage after loading."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch


@torch.no_grad()
def own_unaligned_memory(module: torch.nn.Module, alignment: int = 64) -> None:
    """Copies tensors that loading left at unaligned addresses (memory-mapped safetensors): CPU
    kernels pick other code paths for them and results change in the last bits, so a reloaded
    pipeline would not reproduce its images exactly. Aligned tensors keep their storage."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
            tensor.data = tensor.data.clone()


def encode_text(text_encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    """SD's text conditioning of `texts` (padded to the tokenizer's max length, as SD does)."""
    inputs = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = inputs.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]


def convert_image(image, output_type: str):
    """One image (a CHW float tensor in [0, 1] or a PIL image) in `output_type` form; with
    `"latent"` the image already is the decoder's latents and is returned as it is."""
    if output_type == "latent":
        return image.detach().cpu()
    if isinstance(image, PIL.Image.Image):
        if output_type == "pil":
            return image
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return array if output_type == "np" else torch.from_numpy(array).permute(2, 0, 1).contiguous()
    image = image.detach().float().cpu()
    if output_type == "pt":
        return image
    array = image.permute(1, 2, 0).numpy()
    if output_type == "np":
        return array
    return PIL.Image.fromarray((array * 255).round().astype(np.uint8))


__all__ = ["convert_image", "encode_text", "own_unaligned_memory"]
