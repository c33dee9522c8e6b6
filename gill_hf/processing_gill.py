"""Processor class for GILL: one tokenizer plus one CLIP image processor, with interleaved prompts."""

import re
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .images import check_image_size
from .modeling import IMAGE_TOKEN, add_gill_tokens, img_token_names


logger = logging.get_logger(__name__)

ImageLike = PIL.Image.Image | np.ndarray | torch.Tensor
PromptSegment = str | ImageLike

IMAGE_PLACEHOLDER = "<image>"
_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor)
_EXPECTED_IMAGE = "a PIL.Image, an HWC uint8 numpy array or a CHW float torch tensor in [0, 1]"
# 16-bit, 32-bit integer and float PIL modes: converting them to RGB clips silently, so the caller
# has to choose the scaling.
_HIGH_PRECISION_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
def _is_image(value: object) -> bool:
    return isinstance(value, _IMAGE_TYPES)


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def _to_rgb_pil(image: ImageLike, name: str) -> PIL.Image.Image:
    """Validates one image and converts it to an RGB PIL image.

    Every input goes through PIL so that the image processor sees one well-defined format
    (uint8 RGB) whatever the caller passed. Grayscale arrays/tensors (one channel, or a 2-D array)
    are expanded to three channels; a PIL image in any 8-bit mode is converted with
    `Image.convert("RGB")` (which drops an alpha channel).
    """
    if isinstance(image, PIL.Image.Image):
        check_image_size(image.width, image.height, name)
        if image.mode in _HIGH_PRECISION_MODES:
            raise ValueError(
                f"`{name}` is a PIL image in mode {image.mode!r} (16/32-bit integer or float); expected an "
                "8-bit mode such as 'RGB' or 'L'. Rescale it to 8 bits first."
            )
        try:
            return (image.convert("LA") if image.mode == "La" else image).convert("RGB")
        except (ValueError, OSError) as error:
            raise ValueError(f"`{name}` is a PIL image in mode {image.mode!r} that cannot be read as RGB: {error}") from error

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"`{name}` is a numpy array of dtype {image.dtype}; expected uint8 values in [0, 255] "
                "(pass float images as CHW torch tensors in [0, 1])."
            )
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ValueError(
                f"`{name}` is a numpy array of shape {tuple(image.shape)}; expected (height, width, 3) RGB or "
                "(height, width) / (height, width, 1) grayscale."
            )
        check_image_size(image.shape[1], image.shape[0], name)
        return PIL.Image.fromarray(np.ascontiguousarray(np.repeat(image, 3 // image.shape[2], axis=2)))

    if isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise ValueError(
                f"`{name}` is a torch tensor of dtype {image.dtype}; expected a float tensor with values in [0, 1] "
                "(pass uint8 images as HWC numpy arrays)."
            )
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"`{name}` is a torch tensor of shape {tuple(image.shape)}; expected (3, height, width) RGB or "
                "(1, height, width) grayscale."
            )
        if image.device.type == "meta":
            raise ValueError(f"`{name}` is a tensor on the meta device (it holds no values).")
        check_image_size(image.shape[2], image.shape[1], name)
        image = image.detach().float().cpu()
        if not torch.isfinite(image).all():
            raise ValueError(f"`{name}` contains NaN or infinite values; expected values in [0, 1].")
        if image.min() < 0 or image.max() > 1:
            low, high = image.min().item(), image.max().item()
            raise ValueError(f"`{name}` has values in [{low:.4g}, {high:.4g}]; expected values in [0, 1].")
        array = (image.expand(3, -1, -1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return PIL.Image.fromarray(array)

    raise TypeError(f"`{name}` is a {type(image).__name__}; expected {_EXPECTED_IMAGE}.")


def render_chat(messages: list[dict], tokenizer, chat_template: str | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> tuple[str, list]:
    """Chat messages rendered through the LM's chat template: (text with an `<image>` placeholder per
    image item, the images in order). The same rendering serves `GillProcessor.apply_chat_template`,
    dialogue training examples and the chat demo. An image item holds its image (`"image"`: a PIL
    image, array or tensor, or a local path; or `"path"`), or nothing (the caller supplies it)."""
    rendered, images = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise TypeError(f"`messages[{index}]` must be a dict with a 'role' and a 'content'.")
        content = message.get("content")
        if isinstance(content, str):
            rendered.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise TypeError(f"`messages[{index}]['content']` must be a str or a list of items.")
        parts = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "image":
                parts.append(IMAGE_PLACEHOLDER)
                image = item.get("image", item.get("path"))
                if isinstance(image, str):
                    if image.startswith(("http://", "https://")):
                        raise ValueError(f"`messages[{index}]` names an image by URL; pass the image or a local path (nothing is fetched).")
                    image = PIL.Image.open(image)
                images.append(image)
            elif kind == "text":
                parts.append(str(item.get("text", "")))
            else:
                raise ValueError(f"`messages[{index}]` has a content item of type {kind!r}; expected 'text' or 'image'.")
        rendered.append({"role": message["role"], "content": " ".join(parts)})
    options = {"chat_template": chat_template} if chat_template else {}
    text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=add_generation_prompt and not continue_final_message,
                                         continue_final_message=continue_final_message, **options)
    return text, images


class GillProcessor(ProcessorMixin):
    r"""
    Constructs a GILL processor which wraps a CLIP image processor and a causal LM tokenizer into a single processor
    for interleaved image-and-text prompts.

    On construction the tokenizer is modified in place, as in the reference implementation: it gets a pad token (its
    EOS token when it has none) and the added special tokens `<|image|>` and then `[IMG0]`..`[IMG{n-1}]`, in that
    order, so that OPT's ids match the reference's (50265, then 50266-50273). A tokenizer that already holds them
    (e.g. one saved by this processor) keeps its ids.

    In `input_ids`, every image is `num_visual_tokens` copies of `image_token_id`; the model replaces those positions
    by the image's visual prefix. Text segments are tokenized one by one, the first with the tokenizer's special
    tokens (so a BOS goes before the first text segment only) and [IMG] ids are inserted as ids, never through
    strings.

    Args:
        image_processor ([`CLIPImageProcessor`]):
            The image processor (CLIP preprocessing). Required.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The language model's tokenizer. Required.
        num_img_tokens (`int`, *optional*, defaults to 8):
            Number of `[IMG]` tokens that ask for an image.
        num_visual_tokens (`int`, *optional*, defaults to 4):
            Number of LM input positions one input image occupies.
    """

    image_token = IMAGE_TOKEN

    # ProcessorMixin saves the `__init__` arguments found in `self.__dict__` to processor_config.json and
    # `from_pretrained` passes back only positional-or-keyword ones, so the two counts must stay that way.
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_img_tokens: int = 8,
        num_visual_tokens: int = 4,
        **kwargs,
    ):
        if image_processor is None or tokenizer is None:
            missing = "image_processor" if image_processor is None else "tokenizer"
            raise ValueError(f"`{missing}` is required: GillProcessor needs an image processor and a tokenizer.")
        _check_positive_int("num_img_tokens", num_img_tokens)
        _check_positive_int("num_visual_tokens", num_visual_tokens)
        super().__init__(image_processor, tokenizer, **kwargs)
        self.num_img_tokens = num_img_tokens
        self.num_visual_tokens = num_visual_tokens
        self.img_tokens = img_token_names(num_img_tokens)

        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("`tokenizer` has neither a pad token nor an EOS token to pad with; set `pad_token`.")
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token_id, self.img_token_ids = add_gill_tokens(tokenizer, num_img_tokens)

    def __call__(
        self,
        text: str | list | None = None,
        images: ImageLike | list | None = None,
        *,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        truncation: bool = False,
    ) -> BatchFeature:
        r"""
        Tokenizes one prompt or a batch of prompts made of text and images.

        Args:
            text (`str`, `list[str | image]`, `list[str]` or `list[list[str | image]]`):
                - `str`: one prompt; its `<image>` placeholders bind, in order, to `images`. Whitespace next to a
                  placeholder is dropped (`"Q: <image> what?"` is `["Q:", image, "what?"]`).
                - a list containing at least one image: one interleaved prompt, segments in order, strings as given.
                - a list of `str`: a batch; `images` is then a list with one list of images per prompt.
                - a list of lists: a batch of interleaved prompts.

                Images are `PIL.Image`s, HWC uint8 numpy arrays or CHW float torch tensors in [0, 1]. Empty or
                whitespace-only text segments are skipped.
            images (image or `list`, *optional*):
                The images of `<image>` placeholders (see `text`); not allowed with interleaved prompts.
            padding_side (`str`, *optional*, defaults to `"left"`):
                `"left"` (for generation) or `"right"`.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                Tensor type of the outputs, as for tokenizers.
            max_length (`int`, *optional*):
                Longest allowed prompt, in tokens (e.g. the LM's context minus the tokens to generate).
            truncation (`bool`, *optional*, defaults to `False`):
                When a prompt is longer than `max_length`: `False` raises a `ValueError`; `True` keeps its last
                `max_length` tokens and logs a warning. An image that does not fit whole is dropped whole (with its
                `pixel_values` row), so a truncated prompt may be shorter than `max_length`.

        Returns:
            [`BatchFeature`]: with `input_ids` and `attention_mask` (batch, length), padded with the pad id, and
            `pixel_values` (number of images, 3, height, width) in order of appearance, prompt by prompt (absent when
            there are no images).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
        if max_length is not None:
            _check_positive_int("max_length", max_length)

        rows, all_images = [], []
        for index, segments in enumerate(self._prompts_from_inputs(text, images)):
            pieces = self._tokenize_prompt(segments)
            length = sum(len(ids) for ids, _ in pieces)
            if max_length is not None and length > max_length:
                if not truncation:
                    raise ValueError(
                        f"Prompt {index} of `text` is {length} tokens long, more than `max_length`={max_length}; "
                        "shorten it or pass `truncation=True` to keep its last `max_length` tokens."
                    )
                pieces = self._truncate_left(pieces, max_length, index)
                logger.warning(
                    f"Prompt {index} of `text` ({length} tokens) was truncated to its last "
                    f"{sum(len(ids) for ids, _ in pieces)} tokens (`max_length`={max_length})."
                )
            rows.append([token_id for ids, _ in pieces for token_id in ids])
            all_images.extend(image for _, image in pieces if image is not None)

        data = self._pad(rows, padding_side)
        if all_images:
            data["pixel_values"] = self._pixel_values(all_images, return_tensors)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def build_training_inputs(
        self,
        captions: str | list[str],
        images: ImageLike | list[ImageLike] | None = None,
        max_length: int = 32,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        r"""
        Builds the training rows `[BOS caption [IMG0]..[IMG{n-1}] pad...]`, right-padded to exactly `max_length`.

        Each caption is tokenized alone (with the tokenizer's special tokens) and the [IMG] ids are appended as ids.
        As in the reference, the [IMG] ids always survive truncation: a caption too long for `max_length` is cut so
        that they are the last `num_img_tokens` tokens.

        Args:
            captions (`str` or `list[str]`):
                One caption or a batch of captions.
            images (image or `list` of images, *optional*):
                One image per caption.
            max_length (`int`, *optional*, defaults to 32):
                Length of every row; must exceed `num_img_tokens`.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                Tensor type of the outputs.

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask` (1 on real tokens, 0 on padding) and, when `images` is
            given, `pixel_values`.
        """
        if isinstance(captions, str):
            captions = [captions]
            images = [images] if _is_image(images) else images
        elif isinstance(captions, Sequence):  # e.g. a `datasets` column
            captions = list(captions)
            images = list(images) if isinstance(images, Sequence) and not _is_image(images) else images
        if not isinstance(captions, list) or not captions:
            raise ValueError(f"`captions` must be a str or a non-empty list of str, got {captions!r}.")
        # Room for at least one caption token (the BOS, for most tokenizers) before the [IMG] block.
        _check_positive_int("max_length", max_length, minimum=self.num_img_tokens + 1)
        rows = []
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"`captions[{index}]` is a {type(caption).__name__}; expected a str.")
            if not caption.strip():
                raise ValueError(f"`captions[{index}]` is empty; expected a non-empty caption.")
            # Only the first tokens are kept: bound the text tokenized (a 100k-character caption costs
            # no more than a short one; 256 characters per kept token is far beyond any real token).
            ids = self.encode_text(caption[: 256 * max_length], True, f"captions[{index}]")
            rows.append(ids[: max_length - self.num_img_tokens] + self.img_token_ids)

        data = self._pad(rows, "right", length=max_length)
        if images is not None:
            if not isinstance(images, (list, tuple)) or len(images) != len(captions):
                raise ValueError(
                    f"`images` must be a list with one image per caption ({len(captions)}), got "
                    f"{len(images) if isinstance(images, (list, tuple)) else type(images).__name__}."
                )
            pil_images = [self._image(image, f"images[{i}]") for i, image in enumerate(images)]
            data["pixel_values"] = self._pixel_values(pil_images, return_tensors)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def build_interleaved_training_inputs(
        self, prompts: list, max_length: int = 96, return_tensors: str | None = "pt"
    ) -> BatchFeature:
        r"""
        Builds interleaved training rows: each prompt's segments in order (text tokenized alone, BOS
        before the first text segment only; each image as `num_visual_tokens` `<|image|>`
        placeholders), then the `[IMG0]..[IMG{n-1}]` block; right-padded to the longest row.

        A prompt longer than `max_length` keeps its last tokens before the block: its earliest
        context goes first (an image that does not fit whole goes whole), the block always stays.

        Args:
            prompts (`list[list[str | image]]`): one list of segments per example (the interleaved
                prompt form of `__call__`).
            max_length (`int`, *optional*, defaults to 96): longest row, block included.
            return_tensors (`str`, *optional*, defaults to `"pt"`): tensor type of the outputs.

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask` and, when any prompt holds an image,
            `context_pixel_values` (every context image, in order of appearance, prompt by prompt).
        """
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
            raise ValueError("`prompts` must be a non-empty list with one list of segments per example.")
        _check_positive_int("max_length", max_length, minimum=self.num_img_tokens + 1)
        rows, images = [], []
        for index, prompt in enumerate(prompts):
            pieces = self._tokenize_prompt(self._interleaved_prompt(prompt, f"prompts[{index}]"))
            room = max_length - self.num_img_tokens
            if sum(len(ids) for ids, _ in pieces) > room:
                pieces = self._truncate_left(pieces, room, index)
            rows.append([token for ids, _ in pieces for token in ids] + self.img_token_ids)
            images.extend(image for _, image in pieces if image is not None)
        data = self._pad(rows, "right")
        if images:
            data["context_pixel_values"] = self._pixel_values(images, return_tensors)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, chat_template: str | None = None, tokenize: bool = False,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "pt", processor_kwargs: dict | None = None,
                            **kwargs):
        r"""
        Renders chat messages through the LM's chat template. A message's `content` is a string or a
        list of items `{"type": "text", "text": ...}` / `{"type": "image", "image": <PIL image or local
        path>}` (also `"path"`); each image item becomes an `<image>` placeholder bound to that image.

        Args:
            conversation: a list of messages, or a list of such lists (a batch).
            chat_template: a Jinja template (default: the processor's, else the tokenizer's).
            tokenize: `False` returns the rendered text(s); `True` returns the processor's
                [`BatchFeature`] (`input_ids`, `attention_mask`, `pixel_values`), or only `input_ids`
                without `return_dict`.
            add_generation_prompt, continue_final_message: as for tokenizers' `apply_chat_template`.
            return_tensors, processor_kwargs: passed to the processor when tokenizing.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        texts, images = [], []
        for messages in (conversation if batched else [conversation]):
            text, message_images = render_chat(messages, self.tokenizer, chat_template or self.chat_template,
                                               add_generation_prompt, continue_final_message)
            texts.append(text)
            images.append(message_images)
        if not tokenize:
            return texts if batched else texts[0]
        features = self(text=texts, images=images, return_tensors=return_tensors, **(processor_kwargs or {}))
        return features if return_dict else features["input_ids"]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decoded texts of generated sequences (what transformers' image-text-to-text pipeline reads)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        r"""
        Decodes one sequence, rendering each complete `[IMG0]..[IMG{n-1}]` block and each image's visual positions
        (`num_visual_tokens` copies of `<|image|>`) as `<image>`, separated from the text by single spaces. Text
        without images decodes exactly as with the tokenizer.

        Args:
            token_ids (`list[int]`, 1-D `torch.Tensor` or `np.ndarray`):
                The ids to decode.
            skip_special_tokens (`bool`, *optional*, defaults to `True`):
                Passed to the tokenizer for the text between images.
            kwargs:
                Passed to the tokenizer's `decode`.
        """
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        chunks: list[str | None] = []  # decoded text, or None for an image
        text_ids: list[int] = []

        def flush_text() -> None:
            chunks.append(self.tokenizer.decode(text_ids, skip_special_tokens=skip_special_tokens, **kwargs))
            text_ids.clear()

        position = 0
        while position < len(ids):
            if ids[position : position + self.num_img_tokens] == self.img_token_ids:
                flush_text()
                chunks.append(None)
                position += self.num_img_tokens
            elif ids[position] == self.image_token_id:
                run_end = position
                while run_end < len(ids) and ids[run_end] == self.image_token_id:
                    run_end += 1
                flush_text()
                # Adjacent images form one run; a partial run (left truncation) still shows as one image.
                chunks.extend([None] * -(-(run_end - position) // self.num_visual_tokens))
                position = run_end
            else:
                text_ids.append(ids[position])
                position += 1
        flush_text()

        rendered = []
        for index, chunk in enumerate(chunks):
            if chunk is None:
                rendered.append(IMAGE_PLACEHOLDER)
                continue
            # Only whitespace touching an image is normalised; text chunks are never adjacent.
            if index > 0:
                chunk = chunk.lstrip()
            if index < len(chunks) - 1:
                chunk = chunk.rstrip()
            if chunk:
                rendered.append(chunk)
        return " ".join(rendered)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        r"""
        Decodes a batch of sequences with [`~GillProcessor.decode`].

        Args:
            sequences (`list[list[int]]` or 2-D `torch.Tensor`):
                The sequences to decode.
            skip_special_tokens (`bool`, *optional*, defaults to `True`):
                Passed to the tokenizer for the text between images.
        """
        return [self.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs) for sequence in sequences]

    def _prompts_from_inputs(self, text, images) -> list[list[str | PIL.Image.Image]]:
        """Normalises the four prompt forms to a list of prompts, each a list of strings and RGB PIL images."""
        if isinstance(text, str):
            return [self._bind_placeholders(text, images, "text", "images")]
        if not isinstance(text, (list, tuple)):
            raise TypeError(
                f"`text` is a {type(text).__name__}; expected a str, a list of str, a list of lists or a list mixing "
                "str and images."
            )
        if not text:
            raise ValueError("`text` is an empty list; expected at least one prompt.")

        if any(_is_image(item) for item in text):
            self._reject_images_argument(images)
            return [self._interleaved_prompt(text, "text")]
        if all(isinstance(item, str) for item in text):
            if images is None:
                images = [None] * len(text)
            elif (
                not isinstance(images, (list, tuple))
                or len(images) != len(text)
                or not all(item is None or isinstance(item, (list, tuple)) for item in images)
            ):
                raise ValueError(
                    f"`images` must be a list of {len(text)} lists (or None), one list of images per prompt in `text`."
                )
            return [
                self._bind_placeholders(prompt, prompt_images, f"text[{i}]", f"images[{i}]")
                for i, (prompt, prompt_images) in enumerate(zip(text, images))
            ]
        if all(isinstance(item, (list, tuple)) for item in text):
            self._reject_images_argument(images)
            return [self._interleaved_prompt(prompt, f"text[{i}]") for i, prompt in enumerate(text)]

        for index, item in enumerate(text):
            if not isinstance(item, (str, list, tuple)):
                raise TypeError(f"`text[{index}]` is a {type(item).__name__}; expected a str, a list or an image.")
        raise TypeError("`text` mixes str and lists; expected a list of str or a list of lists.")

    def _bind_placeholders(self, text: str, images, text_name: str, images_name: str) -> list:
        if not isinstance(text, str):
            raise TypeError(f"`{text_name}` is a {type(text).__name__}; expected a str.")
        if images is None:
            images = []
        elif _is_image(images):
            images = [images]
        elif not isinstance(images, (list, tuple)):
            raise TypeError(f"`{images_name}` is a {type(images).__name__}; expected a list of images.")
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(images) != len(pieces) - 1:
            raise ValueError(
                f"`{images_name}` has {len(images)} image(s) but `{text_name}` has {len(pieces) - 1} "
                f"`{IMAGE_PLACEHOLDER}` placeholder(s); expected one image per placeholder."
            )
        segments = []
        for index, piece in enumerate(pieces):
            if index > 0:
                piece = piece.lstrip()
            if index < len(images):
                piece = piece.rstrip()
            if piece.strip():
                segments.append(piece)
            if index < len(images):
                segments.append(self._image(images[index], f"{images_name}[{index}]"))
        if not segments:
            raise ValueError(f"`{text_name}` is an empty prompt; expected text or `{IMAGE_PLACEHOLDER}` placeholders.")
        return segments

    def _interleaved_prompt(self, prompt, name: str) -> list:
        if not prompt:
            raise ValueError(f"`{name}` is an empty prompt; expected strings and images.")
        segments = []
        for index, item in enumerate(prompt):
            if isinstance(item, str):
                if IMAGE_PLACEHOLDER in item:
                    raise ValueError(
                        f"`{name}[{index}]` contains a `{IMAGE_PLACEHOLDER}` placeholder, but an interleaved prompt "
                        "carries its images in the list itself; put the image there instead."
                    )
                if item.strip():
                    segments.append(item)
            elif _is_image(item):
                segments.append(self._image(item, f"{name}[{index}]"))
            else:
                raise TypeError(f"`{name}[{index}]` is a {type(item).__name__}; expected a str or {_EXPECTED_IMAGE}.")
        if not segments:
            raise ValueError(f"`{name}` is an empty prompt (only whitespace); expected text or images.")
        return segments

    @staticmethod
    def _reject_images_argument(images) -> None:
        if images is not None:
            raise ValueError(
                "`images` must be None when `text` holds interleaved prompts: their images are inside `text`."
            )

    @staticmethod
    def _image(image, name: str) -> PIL.Image.Image:
        if not _is_image(image):
            raise TypeError(f"`{name}` is a {type(image).__name__}; expected {_EXPECTED_IMAGE}.")
        return _to_rgb_pil(image, name)

    def encode_text(self, text: str, add_special_tokens: bool = True, name: str = "text") -> list[int]:
        """Token ids of one text segment. GILL's own token strings typed as text (`[IMG0]`..,
        `<|image|>`) tokenize as the plain text they are, never as GILL tokens: only the processor
        inserts those, as ids. `name` is the argument an error message names."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"`{name}` is not valid text ({error.reason} at position {error.start}).") from None
        gill_strings = [self.image_token, *self.img_tokens]
        if not any(token in text for token in gill_strings):
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        others = [t for t in self.tokenizer.all_special_tokens if t not in gill_strings and t in text]
        if not others:  # the whole text as plain text: exactly the tokenization without GILL's tokens
            return self.tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]
        # Chat markers must stay special: only the GILL strings are split, piece by piece.
        pattern = "(" + "|".join(re.escape(token) for token in gill_strings) + ")"
        ids: list[int] = []
        for index, piece in enumerate(re.split(pattern, text)):
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=add_special_tokens and index == 0,
                                      split_special_tokens=piece in gill_strings)["input_ids"]
        return ids

    def _tokenize_prompt(self, segments: list) -> list[tuple[list[int], PIL.Image.Image | None]]:
        """Returns the prompt as (ids, image) pieces: text pieces have image None, image pieces the visual run."""
        pieces = []
        seen_text = False
        for segment in segments:
            if isinstance(segment, str):
                pieces.append((self.encode_text(segment, not seen_text, "text"), None))
                seen_text = True
            else:
                pieces.append(([self.image_token_id] * self.num_visual_tokens, segment))
        return pieces

    @staticmethod
    def _truncate_left(pieces: list, max_length: int, index: int) -> list:
        """Keeps the last `max_length` tokens; an image that does not fit whole goes, with all before it."""
        kept, length = [], 0
        for ids, image in reversed(pieces):
            room = max_length - length
            if len(ids) > room:
                if image is None and room > 0:
                    kept.append((ids[-room:], None))
                break
            kept.append((ids, image))
            length += len(ids)
        if not kept:
            raise ValueError(
                f"Prompt {index} of `text` cannot be truncated to `max_length`={max_length}: its last image alone "
                "needs more positions."
            )
        return kept[::-1]

    def _pixel_values(self, images: list[PIL.Image.Image], return_tensors: str | None):
        return self.image_processor(images=images, return_tensors=return_tensors)["pixel_values"]

    def _pad(self, rows: list[list[int]], padding_side: str, length: int | None = None) -> dict[str, list[list[int]]]:
        length = length or max(len(row) for row in rows)
        input_ids, attention_mask = [], []
        for row in rows:
            padding = [self.tokenizer.pad_token_id] * (length - len(row))
            mask = [1] * len(row)
            if padding_side == "left":
                input_ids.append(padding + row)
                attention_mask.append([0] * len(padding) + mask)
            else:
                input_ids.append(row + padding)
                attention_mask.append(mask + [0] * len(padding))
        return {"input_ids": input_ids, "attention_mask": attention_mask}


__all__ = ["GillProcessor", "render_chat"]
