"""Bounds on input images, shared by the processor, the data collator and the retrieval index
(a leaf module: it imports nothing of the package)."""

from __future__ import annotations

# Images beyond these bounds are refused before any copy is made: a 1 x 20000 strip resized to the
# CLIP processor's square costs gigabytes, and a 50-megapixel image is far past any vision tower's input.
MAX_IMAGE_PIXELS = 50_000_000
MAX_ASPECT_RATIO = 20


def check_image_size(width: int, height: int, name: str) -> None:
    """`ValueError` naming `name` for a zero-size image, one over `MAX_IMAGE_PIXELS`, or one whose
    sides differ by more than `MAX_ASPECT_RATIO`."""
    if width == 0 or height == 0:
        raise ValueError(f"`{name}` is a zero-size image ({width}x{height}).")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"`{name}` is {width}x{height} ({width * height / 1e6:.0f} megapixels); at most "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are accepted (resize it first).")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"`{name}` is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO}:1; crop it first.")


__all__ = ["MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "check_image_size"]
