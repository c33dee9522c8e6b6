"""Interleaved training examples: processor rows, the training forward's text pass over context
images (recomputed by hand), the collator's mixed batches, the readers of VIST / OBELICS / MMC4 on
fixtures in their published schemas, the world's context kinds, and `gill-hf train` on a mix.
Budget: ~20 s on 2 cores."""

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from test_pipeline import tiny_processor
from test_training import one_thread  # noqa: F401 (autouse: one torch thread)
from tiny_models import tiny_gill

from gill_hf.data import GillDataCollator
from gill_hf.interleaved import (MixedDataset, chat_segments, group_weighted_order, image_lookup_from_folder, image_segment,
                                 interleaved_example, parse_group_weights, read_mmc4, read_obelics, read_vist, text_segment)


def _image(seed: int, size: int = 16) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    _image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


# ----- processor rows and the training forward ----------------------------------------------------------


def test_interleaved_rows_hold_placeholders_text_and_the_block(tmp_path):
    proc = tiny_processor(tmp_path)
    prompts = [[_image(0), "make it red"], ["a story about a dog.", "then a cat."]]
    batch = proc.build_interleaved_training_inputs(prompts, max_length=40)
    ids = batch["input_ids"].tolist()
    n_vis, block = proc.num_visual_tokens, proc.img_token_ids
    assert ids[0][:n_vis] == [proc.image_token_id] * n_vis and ids[0][n_vis] == proc.tokenizer.bos_token_id
    for row, mask in zip(ids, batch["attention_mask"].tolist()):
        real = row[: sum(mask)]
        assert real[-len(block):] == block and real.count(block[0]) == 1
    assert batch["context_pixel_values"].shape[0] == 1
    # Too long: the earliest context goes first (a whole image), the block stays.
    long = proc.build_interleaved_training_inputs([[_image(1), "word " * 30 + "end"]], max_length=20)
    row = long["input_ids"][0].tolist()
    assert len(row) == 20 and proc.image_token_id not in row and row[-len(block):] == block
    assert "context_pixel_values" not in long


def test_text_pass_over_context_images_is_the_formula(tmp_path):
    """The interleaved row's text CE, recomputed by hand: LM over [visual prefix, text, [IMG] block],
    CE on the text after the last image and on [IMG0] only."""
    proc = tiny_processor(tmp_path)
    ids = dict(img_token_ids=proc.img_token_ids, image_token_id=proc.image_token_id, vocab_size=len(proc.tokenizer))
    model = tiny_gill("opt", seed=3, **ids)
    image = _image(2, 32)
    batch = proc.build_interleaved_training_inputs([["a dog runs", image, "now blue please"]], max_length=40)
    targets = torch.randn(1, model.config.num_clip_tokens, model.config.gen_emb_dim)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], context_pixel_values=batch["context_pixel_values"],
                    interleaved=torch.tensor([True]), gen_targets=targets)
        row = batch["input_ids"][0].tolist()
        prefix = model.get_visual_prefix(pixel_values=batch["context_pixel_values"])[0]
        embeds, slot = [], 0
        for token in row:
            if token == proc.image_token_id:
                embeds.append(prefix[slot])
                slot += 1
            elif token in proc.img_token_ids:
                embeds.append(model.img_embeddings[proc.img_token_ids.index(token)])
            else:
                embeds.append(model.language_model.get_input_embeddings().weight[token])
        hidden = model.language_model(inputs_embeds=torch.stack(embeds)[None], output_hidden_states=True).hidden_states[-1][0]
        last_image = max(i for i, t in enumerate(row) if t == proc.image_token_id)
        img0 = row.index(proc.img_token_ids[0])
        losses = []
        for position in range(last_image + 1, img0 + 1):  # text after the image, and [IMG0]
            logits = hidden[position - 1] @ model.language_model.get_output_embeddings().weight.T
            logits = torch.cat([logits, torch.full((model.logits_width - logits.shape[0],), float("-inf"))])
            logits[proc.img_token_ids] = hidden[position - 1] @ model.img_embeddings.T
            losses.append(F.cross_entropy(logits[None], torch.tensor([row[position]])))
        assert torch.allclose(out.text_loss, torch.stack(losses).mean(), atol=1e-5)
        states = hidden[img0: img0 + len(proc.img_token_ids)]
        assert torch.allclose(out.img_hidden_states[0], states, atol=1e-5)
    assert out.caption_loss is None and out.contrastive_loss is None and out.gen_loss is not None


def test_a_call_with_training_inputs_is_a_training_call_whatever_its_placeholders(tmp_path):
    proc = tiny_processor(tmp_path)
    ids = dict(img_token_ids=proc.img_token_ids, image_token_id=proc.image_token_id, vocab_size=len(proc.tokenizer))
    model = tiny_gill("opt", **ids)
    batch = proc.build_interleaved_training_inputs([[_image(0), "a cat"]])
    with torch.no_grad():
        training = model(input_ids=batch["input_ids"], context_pixel_values=batch["context_pixel_values"],
                         interleaved=torch.tensor([True]))
        decoding = model(input_ids=batch["input_ids"], pixel_values=batch["context_pixel_values"])
    assert training.text_loss is not None and decoding.logits is not None
    with pytest.raises(ValueError, match="interleaved"):
        model(input_ids=batch["input_ids"], context_pixel_values=batch["context_pixel_values"],
              gen_targets=torch.zeros(1, model.config.num_clip_tokens, model.config.gen_emb_dim))


# ----- the collator --------------------------------------------------------------------------------------


def _caption_example(i: int) -> dict:
    return {"caption": f"a caption number {i}", "image": {"bytes": _png(i), "path": None}, "gen_targets": np.ones((6, 20))}


def _interleaved_example(i: int, with_target_image: bool = True) -> dict:
    example = interleaved_example([image_segment(_png(10 + i)), text_segment("the same, but red")], "a red thing",
                                  _png(20 + i) if with_target_image else None)
    return {**example, "gen_targets": np.zeros((6, 20))}


def test_caption_only_batches_are_exactly_caption_training(tmp_path):
    collator = GillDataCollator(tiny_processor(tmp_path), max_length=16, num_clip_tokens=6, gen_emb_dim=20)
    batch = collator([_caption_example(i) for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "gen_targets"}
    assert batch["input_ids"].shape == (3, 16)


def test_mixed_batches_flag_rows_pair_targets_and_train(tmp_path):
    proc = tiny_processor(tmp_path)
    collator = GillDataCollator(proc, max_length=16, num_clip_tokens=6, gen_emb_dim=20)
    examples = [_caption_example(0), _interleaved_example(0), _interleaved_example(1, with_target_image=False)]
    batch = collator(examples)
    assert batch["interleaved"].tolist() == [False, True, True] and batch["paired"].tolist() == [True, True, False]
    assert batch["pixel_values"].shape[0] == 3 and batch["context_pixel_values"].shape[0] == 2
    assert batch["input_ids"].shape[0] == 3 and batch["gen_targets"].shape == (3, 6, 20)
    ids = dict(img_token_ids=proc.img_token_ids, image_token_id=proc.image_token_id, vocab_size=len(proc.tokenizer))
    out = tiny_gill("opt", **ids)(**batch)
    assert out.logits_per_image.shape == (2, 2)  # the contrastive loss over paired rows only
    assert out.caption_logits.shape[0] == 1  # the captioning pass over the caption row only
    assert torch.isfinite(out.loss)


def test_mixed_dataset_keeps_every_caption_and_the_ratio():
    mixed = MixedDataset(list(range(30)), ["i0", "i1"], ratio=0.25)
    rows = [mixed[i] for i in range(len(mixed))]
    assert len(mixed) == 40 and rows[:30] == list(range(30)) and rows[30:] == ["i0", "i1"] * 5
    with pytest.raises(ValueError, match="interleaved_ratio"):
        MixedDataset([1], [2], ratio=1.0)


def test_group_weights_set_each_groups_share_of_the_interleaved_rows():
    groups = ["a"] * 40 + ["b"] * 40 + ["c"] * 20  # row weights a=3, b=1 (unnamed), c=0
    order = group_weighted_order(groups, parse_group_weights("a=3, c=0"), seed=1)
    drawn = [groups[i] for i in order]
    assert len(order) == 100 and drawn.count("a") == 75 and drawn.count("b") == 25 and "c" not in drawn
    a_rows = [i for i in order if groups[i] == "a"]  # 75 draws of 40 rows: each row twice before any row a third time
    assert sorted(set(a_rows)) == list(range(40)) and max(a_rows.count(i) for i in range(40)) == 2
    assert order == group_weighted_order(groups, {"a": 3.0, "c": 0.0}, seed=1) != group_weighted_order(groups, {"a": 3.0, "c": 0.0}, seed=2)
    mixed = MixedDataset(list(range(10)), [f"i{i}" for i in range(4)], ratio=0.5, order=[3, 3, 1])
    assert [mixed[i] for i in range(10, 20)] == ["i3", "i3", "i1"] * 3 + ["i3"]
    for spec in ("a", "a=-1", "a=x", "=2"):
        with pytest.raises(ValueError, match="interleaved_group_weights"):
            parse_group_weights(spec)
    with pytest.raises(ValueError, match="no rows: \\['d'\\]"):
        group_weighted_order(groups, {"d": 2.0})
    with pytest.raises(ValueError, match="order"):
        MixedDataset([1], [2], ratio=0.5, order=[1])


# ----- readers on fixtures in the published schemas --------------------------------------------------------


def _vist_fixture(tmp_path):
    images = tmp_path / "images" / "val"
    images.mkdir(parents=True)
    annotations, photos = [], []
    for story in range(2):
        for order in range(5):
            photo = f"{1000 + 10 * story + order}"
            photos.append({"id": photo, "album_id": "a", "title": "t", "tags": "", "url_o": f"http://x/{photo}.jpg"})
            if not (story == 1 and order == 3):  # one photo missing from the archive
                _image(order + 5 * story).save(images / f"{photo}{'.png' if order == 2 else '.jpg'}")
            annotations.append([{"story_id": str(45530 + story), "storylet_id": str(story * 5 + order), "album_id": "a",
                                 "photo_flickr_id": photo, "worker_arranged_photo_order": 4 - order,
                                 "text": f"sentence [male] {order} .", "original_text": f"Sentence {order} of story {story}.",
                                 "tier": "story-in-sequence", "setting": "first-2-pick-and-tell", "worker_id": "w"}])
    sis = tmp_path / "val.story-in-sequence.json"
    sis.write_text(json.dumps({"info": {}, "type_": "story-in-sequence", "images": photos, "albums": [], "annotations": annotations}))
    return sis, images


def test_vist_reader_builds_story_prefixes_and_counts_holes(tmp_path):
    sis, images = _vist_fixture(tmp_path)
    dataset = read_vist(sis, images)
    assert len(dataset) == 4  # story 0: k = 1..4; story 1 has a missing photo
    last = dataset[3]
    kinds = [s["type"] for s in last["segments"]]
    assert kinds == ["image", "text"] * 4 + ["text"]
    # Ordered by worker_arranged_photo_order (the file lists them in reverse).
    assert [s["text"] for s in last["segments"] if s["type"] == "text"] == [f"Sentence {o} of story 0." for o in (4, 3, 2, 1, 0)]
    assert last["target_caption"] == "Sentence 0 of story 0." and last["target_image"].size == (16, 16)
    assert json.loads(dataset.info.description)["skipped"] == {"missing_image": 1}
    text_only = read_vist(sis, images, include_images=False)
    assert all(s["type"] == "text" for s in text_only[0]["segments"])
    broken = tmp_path / "broken.json"
    broken.write_text(sis.read_text()[:100])
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        read_vist(broken, images)


def test_obelics_and_mmc4_readers_never_fetch(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        _image(len(name)).save(folder / name)
    lookup = image_lookup_from_folder(folder)
    documents = [{"texts": ["Intro text.", None, "A photo of a.", None, "Tail."],
                  "images": [None, "http://site/a.jpg", None, "http://site/missing.jpg", None],
                  "metadata": "{}", "general_metadata": "{}"}]
    obelics = read_obelics(documents, lookup)
    assert len(obelics) == 1 and obelics[0]["target_caption"] == "A photo of a."
    assert [s["type"] for s in obelics[0]["segments"]] == ["text"]
    with pytest.raises(ValueError, match="exactly one"):
        read_obelics([{"texts": ["x", "y"], "images": ["u", None]}], lookup)
    mmc4 = tmp_path / "docs.jsonl"
    mmc4.write_text(json.dumps({"url": "u", "text_list": ["First.", "Second about b.", "Third."],
                                "image_info": [{"image_name": "b.jpg", "raw_url": "http://x/b.jpg", "matched_text_index": 1,
                                                "matched_sim": 0.3}], "similarity_matrix": [[0.1, 0.3, 0.2]],
                                "could_have_url_duplicate": 0}) + "\n{not json\n")
    with pytest.raises(ValueError, match="docs.jsonl.* line 2"):
        read_mmc4(mmc4, lookup)
    mmc4.write_text(mmc4.read_text().splitlines()[0] + "\n")
    dataset = read_mmc4(mmc4, lookup)
    assert dataset[0]["target_caption"] == "Second about b." and dataset[0]["segments"][0]["text"] == "First."


def test_chat_segments_render_the_template_around_images():
    class Template:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt, continue_final_message=False):
            return "".join(f"<{m['role']}>{m['content']}</s>" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Make it red."}]
    segments = chat_segments(messages, Template(), [b"png"])
    assert [s["type"] for s in segments] == ["text", "image", "text"]
    assert segments[0]["text"] == "<user>" and segments[2]["text"].endswith("<user>Make it red.</s><assistant>")
    with pytest.raises(ValueError, match="1 image items but 0"):
        chat_segments(messages, Template(), [])
