"""GILL's added tokens: `<|image|>` (an image's visual prefix positions) and `[IMG0]`.. (the block
whose states become images)."""

from __future__ import annotations

from transformers.tokenization_utils_base import AddedToken

IMAGE_TOKEN = "<|image|>"


def img_token_names(num_img_tokens: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(num_img_tokens)]


def add_gill_tokens(tokenizer, num_img_tokens: int = 8) -> tuple[int, list[int]]:
    """Adds `<|image|>` and then `[IMG0]`.. to `tokenizer` (in place, in the reference's order, so
    OPT gets 50265 and 50266-50273) and returns their ids. Tokens already present keep their ids.
    """
    # `add_tokens` keeps the list order and skips tokens already present, so ids never move.
    tokens = [IMAGE_TOKEN, *img_token_names(num_img_tokens)]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in tokens], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    img_token_ids = tokenizer.convert_tokens_to_ids(img_token_names(num_img_tokens))
    return image_token_id, list(img_token_ids)


__all__ = ["IMAGE_TOKEN", "add_gill_tokens", "img_token_names"]
