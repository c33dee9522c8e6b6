"""Tests for GillProcessor: id layouts, prompt forms, training rows, decoding, save/load, bad input."""

import json
import os
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoTokenizer

from gill_hf import processing_gill
from gill_hf.processing_gill import GillProcessor

from tiny_tokenizers import gpt2_like_tokenizer, llama_like_tokenizer, opt_like_tokenizer, tiny_image_processor


TOKENIZER_BUILDERS = {"opt": opt_like_tokenizer, "gpt2": gpt2_like_tokenizer, "llama": llama_like_tokenizer}


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> PIL.Image.Image:
    return PIL.Image.new("RGB", size, color)


RED, GREEN, BLUE = solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))


@pytest.fixture
def processor(tmp_path) -> GillProcessor:
    return GillProcessor(tiny_image_processor(), opt_like_tokenizer(tmp_path))


def encode(processor: GillProcessor, text: str, first: bool) -> list[int]:
    """What tokenizing one segment alone gives (the first segment with special tokens)."""
    return processor.tokenizer(text, add_special_tokens=first)["input_ids"]


def visual(processor: GillProcessor, count: int = 1) -> list[int]:
    return [processor.image_token_id] * (processor.num_visual_tokens * count)


def pixels_of(processor: GillProcessor, *images) -> torch.Tensor:
    return processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------- added tokens


def test_opt_like_added_ids_follow_the_original_vocabulary(tmp_path):
    tokenizer = opt_like_tokenizer(tmp_path)
    original_size = len(tokenizer)
    processor = GillProcessor(tiny_image_processor(), tokenizer)

    assert processor.image_token == "<|image|>"
    assert processor.image_token_id == original_size
    assert processor.img_tokens == [f"[IMG{i}]" for i in range(8)]
    assert processor.img_token_ids == list(range(original_size + 1, original_size + 9))
    assert len(tokenizer) == original_size + 9
    # OPT's own layout is untouched: pad <pad>=1, bos=eos=</s>=2.
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2, 2)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, name):
    tokenizer = TOKENIZER_BUILDERS[name](tmp_path)
    assert tokenizer.pad_token is None
    processor = GillProcessor(tiny_image_processor(), tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert processor.img_token_ids == [processor.image_token_id + 1 + i for i in range(8)]


def test_existing_tokens_keep_their_ids(tmp_path, processor):
    size = len(processor.tokenizer)
    processor.tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    again = GillProcessor(tiny_image_processor(), reloaded)
    assert len(reloaded) == size
    assert again.image_token_id == processor.image_token_id
    assert again.img_token_ids == processor.img_token_ids
    # Wrapping the same tokenizer twice adds nothing either.
    GillProcessor(tiny_image_processor(), processor.tokenizer)
    assert len(processor.tokenizer) == size


def test_custom_token_counts(tmp_path):
    tokenizer = opt_like_tokenizer(tmp_path)
    size = len(tokenizer)
    processor = GillProcessor(tiny_image_processor(), tokenizer, num_img_tokens=3, num_visual_tokens=2)
    assert processor.img_token_ids == [size + 1, size + 2, size + 3]
    ids = processor(["A dog", RED]).input_ids[0].tolist()
    assert ids[-2:] == [size, size] and ids.count(size) == 2


# ---------------------------------------------------------------- prompt layouts


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama"])
def test_text_first_prompt_layout(tmp_path, name):
    processor = GillProcessor(tiny_image_processor(), TOKENIZER_BUILDERS[name](tmp_path))
    out = processor("What is this? <image> Now draw it at night.", [RED])
    expected = (
        encode(processor, "What is this?", first=True)
        + visual(processor)
        + encode(processor, "Now draw it at night.", first=False)
    )
    assert out.input_ids.tolist() == [expected]
    assert out.input_ids.dtype == torch.long
    assert out.attention_mask.tolist() == [[1] * len(expected)]
    assert out.pixel_values.shape == (1, 3, 32, 32)


def test_bos_goes_before_the_first_text_segment_only(processor):
    bos = processor.tokenizer.bos_token_id
    text_first = processor("A dog <image> runs", [RED]).input_ids[0].tolist()
    assert text_first[0] == bos and text_first.count(bos) == 1

    image_first = processor([RED, "A dog", GREEN, "runs"]).input_ids[0].tolist()
    assert image_first[:4] == visual(processor)
    assert image_first[4] == bos and image_first.count(bos) == 1

    assert processor([RED]).input_ids[0].tolist() == visual(processor)  # no text, no BOS


def test_llama_like_image_first_prompt_has_bos_after_the_visual_run(tmp_path):
    processor = GillProcessor(tiny_image_processor(), llama_like_tokenizer(tmp_path))
    ids = processor("<image> A dog", RED).input_ids[0].tolist()
    assert ids == visual(processor) + [processor.tokenizer.bos_token_id] + encode(processor, "A dog", False)


def test_interleaved_list_tokenizes_each_segment_alone_and_skips_blank_ones(processor):
    out = processor(["Q:", RED, " and then", GREEN, "   ", BLUE, "end."])
    expected = (
        encode(processor, "Q:", True)
        + visual(processor)
        + encode(processor, " and then", False)
        + visual(processor, 2)
        + encode(processor, "end.", False)
    )
    assert out.input_ids[0].tolist() == expected
    torch.testing.assert_close(out.pixel_values, pixels_of(processor, RED, GREEN, BLUE))


def test_string_form_equals_list_form_with_whitespace_at_placeholders_dropped(processor):
    from_string = processor("Q: <image>  what is it? <image><image>", [RED, GREEN, BLUE])
    from_list = processor(["Q:", RED, "what is it?", GREEN, BLUE])
    assert from_string.input_ids.tolist() == from_list.input_ids.tolist()
    torch.testing.assert_close(from_string.pixel_values, from_list.pixel_values)


def test_single_image_is_accepted_for_a_single_placeholder(processor):
    assert processor("A <image>", RED).input_ids.tolist() == processor("A <image>", [RED]).input_ids.tolist()


def test_batch_of_strings_orders_pixel_values_prompt_by_prompt(processor):
    out = processor(["<image> first <image>", "no image", "third <image>"], [[RED, GREEN], None, [BLUE]])
    assert out.input_ids.shape[0] == 3
    torch.testing.assert_close(out.pixel_values, pixels_of(processor, RED, GREEN, BLUE))
    unpadded = [row[mask.bool()].tolist() for row, mask in zip(out.input_ids, out.attention_mask)]
    assert unpadded[1] == encode(processor, "no image", True)
    assert unpadded[2] == encode(processor, "third", True) + visual(processor)


def test_batch_of_interleaved_prompts(processor):
    out = processor([[RED, "a red one"], ["a green one", GREEN, "and", BLUE]])
    torch.testing.assert_close(out.pixel_values, pixels_of(processor, RED, GREEN, BLUE))
    single = processor(["a green one", GREEN, "and", BLUE]).input_ids[0]
    assert out.input_ids[1].tolist() == single.tolist()  # the longest row carries no padding


def test_text_only_prompt_has_no_pixel_values(processor):
    out = processor(["A dog.", "A dog runs across the park."])
    assert "pixel_values" not in out
    assert set(out.keys()) == {"input_ids", "attention_mask"}


def test_left_and_right_padding(processor):
    short, long = encode(processor, "A dog", True), encode(processor, "A dog runs across the park", True)
    pad = processor.tokenizer.pad_token_id
    gap = len(long) - len(short)
    assert gap > 0

    left = processor(["A dog", "A dog runs across the park"])
    assert left.input_ids.tolist() == [[pad] * gap + short, long]
    assert left.attention_mask.tolist() == [[0] * gap + [1] * len(short), [1] * len(long)]

    right = processor(["A dog", "A dog runs across the park"], padding_side="right")
    assert right.input_ids.tolist() == [short + [pad] * gap, long]
    assert right.attention_mask.tolist() == [[1] * len(short) + [0] * gap, [1] * len(long)]


def test_return_tensors_none_gives_lists(processor):
    out = processor("A <image>", [RED], return_tensors=None)
    assert isinstance(out["input_ids"], list) and isinstance(out["input_ids"][0], list)
    assert len(out["pixel_values"]) == 1


# ---------------------------------------------------------------- image types


def test_pil_numpy_and_tensor_images_give_the_same_pixels(processor):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(24, 36, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    out = processor(["x", PIL.Image.fromarray(array), array, tensor])
    torch.testing.assert_close(out.pixel_values[0], out.pixel_values[1])
    torch.testing.assert_close(out.pixel_values[0], out.pixel_values[2])


def test_grayscale_is_expanded_to_rgb(processor):
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    as_tensor = torch.from_numpy(gray)[None].float() / 255
    out = processor(["x", rgb, gray, gray[:, :, None], as_tensor, PIL.Image.fromarray(gray, mode="L")])
    for row in out.pixel_values[1:]:
        torch.testing.assert_close(row, out.pixel_values[0])


# ---------------------------------------------------------------- max_length and truncation


def test_prompt_longer_than_max_length_is_an_error(processor):
    length = len(encode(processor, "A dog runs across the park.", True))
    assert processor("A dog runs across the park.", max_length=length).input_ids.shape == (1, length)
    with pytest.raises(ValueError, match="max_length"):
        processor("A dog runs across the park.", max_length=length - 1)


def test_truncation_keeps_the_last_tokens_and_warns(processor):
    full = processor("A dog runs across the park. <image> And then?", [RED]).input_ids[0].tolist()
    with mock.patch.object(processing_gill.logger, "warning") as warning:
        out = processor("A dog runs across the park. <image> And then?", [RED], max_length=10, truncation=True)
    assert out.input_ids[0].tolist() == full[-10:]
    assert out.pixel_values.shape[0] == 1
    warning.assert_called_once()
    assert "truncated" in warning.call_args.args[0]


def test_truncation_never_cuts_inside_a_visual_run(processor):
    tail = encode(processor, "And then?", False)
    prompts = [["A dog runs.", RED, "And then?"], ["A", GREEN]]

    # The cut would fall two positions into the red image's run: the whole image goes, and its pixels.
    out = processor(prompts, max_length=len(tail) + 2, truncation=True, padding_side="right")
    assert out.input_ids[0, : out.attention_mask[0].sum()].tolist() == tail
    torch.testing.assert_close(out.pixel_values, pixels_of(processor, GREEN))

    # With room for the whole run, the image stays.
    out = processor(prompts, max_length=len(tail) + 4, truncation=True)
    assert out.input_ids[0].tolist() == visual(processor) + tail
    torch.testing.assert_close(out.pixel_values, pixels_of(processor, RED, GREEN))
    # `datasets` columns (sequences, not lists) give the same rows
    import datasets

    columns = datasets.Dataset.from_dict({"caption": ["A dog.", "Two birds."], "image": [RED, GREEN]})
    from_columns = processor.build_training_inputs(columns["caption"], images=columns["image"], max_length=16)
    from_lists = processor.build_training_inputs(["A dog.", "Two birds."], images=[RED, GREEN], max_length=16)
    assert from_columns.input_ids.tolist() == from_lists.input_ids.tolist()
    torch.testing.assert_close(from_columns.pixel_values, from_lists.pixel_values)


def test_truncation_that_leaves_nothing_is_an_error(processor):
    with pytest.raises(ValueError, match="max_length"):
        processor(["A dog", RED], max_length=2, truncation=True)


# ---------------------------------------------------------------- training rows


def test_training_row_for_a_short_caption_is_right_padded(processor):
    caption = encode(processor, "A dog sits on the beach.", True)
    out = processor.build_training_inputs(["A dog sits on the beach."], max_length=32)
    pad = processor.tokenizer.pad_token_id
    real = caption + processor.img_token_ids
    assert out.input_ids.tolist() == [real + [pad] * (32 - len(real))]
    assert out.attention_mask.tolist() == [[1] * len(real) + [0] * (32 - len(real))]
    assert out.input_ids[0, 0].item() == processor.tokenizer.bos_token_id
    assert "pixel_values" not in out


def test_training_row_for_a_long_caption_keeps_the_img_tokens_last(processor):
    text = "A dog runs across the park at night, and two birds look at the busy street."
    caption = encode(processor, text, True)
    assert len(caption) + 8 > 32
    out = processor.build_training_inputs(text, max_length=32)
    row = out.input_ids[0].tolist()
    assert len(row) == 32
    assert row[-8:] == processor.img_token_ids
    assert row[:24] == caption[:24]
    assert out.attention_mask[0].tolist() == [1] * 32


def test_training_row_that_fits_exactly_is_not_cut(processor):
    caption = encode(processor, "A dog sits on the beach.", True)
    out = processor.build_training_inputs("A dog sits on the beach.", max_length=len(caption) + 8)
    assert out.input_ids[0].tolist() == caption + processor.img_token_ids


def test_training_rows_with_pad_equal_to_eos_are_told_apart_by_the_mask(tmp_path):
    processor = GillProcessor(tiny_image_processor(), gpt2_like_tokenizer(tmp_path))
    out = processor.build_training_inputs(["A dog.", "Two birds."], images=[RED, GREEN], max_length=16)
    for row, mask, text in zip(out.input_ids.tolist(), out.attention_mask.tolist(), ["A dog.", "Two birds."]):
        real = encode(processor, text, True) + processor.img_token_ids  # no BOS for GPT-2
        assert row[: len(real)] == real and row[len(real) :] == [processor.tokenizer.eos_token_id] * (16 - len(real))
        assert mask == [1] * len(real) + [0] * (16 - len(real))
    torch.testing.assert_close(out.pixel_values, pixels_of(processor, RED, GREEN))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"captions": ["a dog"], "max_length": 8}, ValueError, "max_length"),
        ({"captions": []}, ValueError, "captions"),
        ({"captions": ["a dog", 3]}, TypeError, r"captions\[1\]"),
        ({"captions": ["a dog", "  "]}, ValueError, r"captions\[1\]"),
        ({"captions": ["a dog", "a cat"], "images": [RED]}, ValueError, "images"),
        ({"captions": ["a dog"], "images": [None]}, TypeError, r"images\[0\]"),
    ],
)
def test_training_inputs_validation(processor, kwargs, error, match):
    with pytest.raises(error, match=match):
        processor.build_training_inputs(**kwargs)


# ---------------------------------------------------------------- decoding


def test_decode_text_only_matches_the_tokenizer(processor):
    ids = encode(processor, "A dog runs across the park.", True)
    for skip in (True, False):
        assert processor.decode(ids, skip_special_tokens=skip) == processor.tokenizer.decode(
            ids, skip_special_tokens=skip
        )


def test_decode_renders_img_blocks_and_visual_runs(processor):
    img = processor.img_token_ids
    ids = (
        visual(processor, 2)
        + encode(processor, "A dog", True)
        + img
        + encode(processor, " runs.", False)
        + img
    )
    assert processor.decode(ids) == "<image> <image> A dog <image> runs. <image>"
    assert processor.decode(torch.tensor(ids), skip_special_tokens=False) == (
        "<image> <image> </s>A dog <image> runs. <image>"
    )


def test_decode_leaves_an_incomplete_img_block_to_the_tokenizer(processor):
    ids = encode(processor, "A dog", True) + processor.img_token_ids[:4]
    assert processor.decode(ids) == "A dog"
    assert "[IMG3]" in processor.decode(ids, skip_special_tokens=False)


def test_batch_decode_on_a_left_padded_batch(processor):
    out = processor(["A dog <image> runs.", "Two birds."], [[RED], []])
    assert processor.batch_decode(out.input_ids) == ["A dog <image> runs.", "Two birds."]


# ---------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path):
    processor = GillProcessor(
        tiny_image_processor(), gpt2_like_tokenizer(tmp_path), num_img_tokens=3, num_visual_tokens=2
    )
    processor.save_pretrained(tmp_path / "saved")
    with open(os.path.join(tmp_path / "saved", "processor_config.json")) as f:
        config = json.load(f)
    assert (config["num_img_tokens"], config["num_visual_tokens"]) == (3, 2)

    loaded = GillProcessor.from_pretrained(tmp_path / "saved")
    assert (loaded.num_img_tokens, loaded.num_visual_tokens) == (3, 2)
    assert loaded.image_token_id == processor.image_token_id
    assert loaded.img_token_ids == processor.img_token_ids
    assert loaded.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    assert len(loaded.tokenizer) == len(processor.tokenizer)
    prompt = (["A dog <image> runs.", "<image> Two birds."], [[RED], [GREEN]])
    before, after = processor(*prompt), loaded(*prompt)
    assert before.input_ids.tolist() == after.input_ids.tolist()
    torch.testing.assert_close(before.pixel_values, after.pixel_values)
    training = processor.build_training_inputs("A dog.", max_length=12).input_ids
    assert loaded.build_training_inputs("A dog.", max_length=12).input_ids.tolist() == training.tolist()


# ---------------------------------------------------------------- bad input


def pil(mode: str, size=(8, 8)) -> PIL.Image.Image:
    return PIL.Image.new(mode, size)


@pytest.mark.parametrize(
    "text, images, error, match",
    [
        # image count != placeholder count
        ("a <image> b <image>", [RED], ValueError, "images"),
        ("no placeholder", [RED], ValueError, "images"),
        (["<image> a", "b"], [[], []], ValueError, r"images\[0\]"),
        (["<image> a", "<image> b"], [RED, GREEN], ValueError, "images"),
        (["<image> a"], None, ValueError, r"images\[0\]"),
        ([RED, "a"], [GREEN], ValueError, "images"),
        # zero-size images
        ("<image>", [pil("RGB", (0, 8))], ValueError, "zero-size"),
        ("<image>", [np.zeros((0, 8, 3), np.uint8)], ValueError, "zero-size"),
        ("<image>", [torch.zeros(3, 8, 0)], ValueError, "zero-size"),
        # 16-bit, 32-bit integer and float PIL modes
        ("<image>", [pil("I;16")], ValueError, "mode"),
        ("<image>", [pil("I")], ValueError, "mode"),
        ("<image>", [pil("F")], ValueError, "mode"),
        # arrays that are not HWC uint8 RGB
        ("<image>", [np.zeros((8, 8, 3), np.float32)], ValueError, "uint8"),
        ("<image>", [np.zeros((8, 8, 3), np.uint16)], ValueError, "uint8"),
        ("<image>", [np.zeros((8, 8, 4), np.uint8)], ValueError, "shape"),
        ("<image>", [np.zeros((3, 8, 8), np.uint8)], ValueError, "shape"),
        ("<image>", [np.zeros((1, 8, 8, 3), np.uint8)], ValueError, "shape"),
        # tensors outside [0, 1], with NaN, wrong channels or dtype
        ("<image>", [torch.full((3, 8, 8), 1.5)], ValueError, r"\[0, 1\]"),
        ("<image>", [torch.full((3, 8, 8), -0.1)], ValueError, r"\[0, 1\]"),
        ("<image>", [torch.full((3, 8, 8), float("nan"))], ValueError, "NaN"),
        ("<image>", [torch.rand(4, 8, 8)], ValueError, "shape"),
        ("<image>", [torch.rand(8, 8, 3)], ValueError, "shape"),
        ("<image>", [torch.rand(1, 3, 8, 8)], ValueError, "shape"),
        ("<image>", [torch.zeros(3, 8, 8, dtype=torch.uint8)], ValueError, "float"),
        # None and non-images in prompt lists
        (["a", None, RED], None, TypeError, r"text\[1\]"),
        ([RED, object()], None, TypeError, r"text\[1\]"),
        ([["a", RED], ["b", None]], None, TypeError, r"text\[1\]\[1\]"),
        (["a", None], None, TypeError, r"text\[1\]"),
        (["a", ["b"]], None, TypeError, "text"),
        ("<image>", [None], TypeError, r"images\[0\]"),
        ("<image>", ["red.png"], TypeError, r"images\[0\]"),
        (None, None, TypeError, "text"),
        (42, None, TypeError, "text"),
        # empty prompts and empty batches
        ("", None, ValueError, "empty"),
        ("   ", None, ValueError, "empty"),
        ([], None, ValueError, "empty"),
        ([[]], None, ValueError, r"text\[0\]"),
        ([["  "]], None, ValueError, r"text\[0\]"),
        (["a", ""], None, ValueError, r"text\[1\]"),
        # markers that would desynchronise ids and images
        ([RED, "a <image>"], None, ValueError, r"text\[1\]"),
    ],
)
def test_bad_prompts(processor, text, images, error, match):
    with pytest.raises(error, match=match):
        processor(text, images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"padding_side": "middle"}, "padding_side"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": 2.5}, "max_length"),
    ],
)
def test_bad_call_options(processor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        processor("A dog", **kwargs)


def test_bad_constructor_arguments(tmp_path):
    tokenizer, image_processor = opt_like_tokenizer(tmp_path), tiny_image_processor()
    with pytest.raises(ValueError, match="tokenizer"):
        GillProcessor(image_processor, None)
    with pytest.raises(ValueError, match="image_processor"):
        GillProcessor(None, tokenizer)
    with pytest.raises(ValueError, match="num_img_tokens"):
        GillProcessor(image_processor, tokenizer, num_img_tokens=0)
    with pytest.raises(ValueError, match="num_visual_tokens"):
        GillProcessor(image_processor, tokenizer, num_visual_tokens=2.0)
