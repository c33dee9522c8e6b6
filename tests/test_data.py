"""Data: the CC3M layout, `datasets` image + caption datasets (streaming too), the collator's
skipping of unreadable inputs, target precompute and cached vision features."""

import io
import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from test_training import one_thread  # noqa: F401 (autouse: one torch thread)
from tiny_models import tiny_gill
from tiny_tokenizers import opt_like_tokenizer, tiny_image_processor
from transformers import CLIPTextConfig, CLIPTextModel

from gill_hf import GillProcessor
from gill_hf.data import (GillDataCollator, cache_image_features, encode_captions_for_sd, load_cc3m_dataset,
                          precompute_gen_targets, prepare_hf_dataset)

CAPTIONS = ["A dog runs across the park.", "The cat sits on a wooden table.", "A red car looks at the beach!",
            "Two birds jump over the river.", "A girl walks along a busy street.", "My friend sleeps under the park."]



def processor(tmp_path):
    return GillProcessor(image_processor=tiny_image_processor(), tokenizer=opt_like_tokenizer(tmp_path))


def png_bytes(seed):
    array = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_cc3m(folder, n=6, corrupt=(), no_image=(), no_target=(), pickled_target=()):
    """The reference layout: folder/train.tsv (`caption\\timage`), folder/images/<name>, and
    folder/images/clip_embs/<name>.npy targets (6 x 20, the tiny model's target shape)."""
    images = folder / "images"
    (images / "clip_embs").mkdir(parents=True)
    lines = ["caption\timage"]
    for i in range(n):
        name = f"{i:05d}.png"
        lines.append(f"{CAPTIONS[i % len(CAPTIONS)]}\t{name}")
        if i not in no_image:
            (images / name).write_bytes(b"not a png at all" if i in corrupt else png_bytes(i))
        if i in pickled_target:
            np.save(images / "clip_embs" / f"{name}.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        elif i not in no_target:
            np.save(images / "clip_embs" / f"{name}.npy", np.random.default_rng(i).normal(size=(8, 20)).astype(np.float16))
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder / "train.tsv", images


def test_cc3m_layout_reuses_targets_and_skips_bad_files(tmp_path):
    tsv, images = make_cc3m(tmp_path, n=8, corrupt=(1,), no_image=(2,), no_target=(3,), pickled_target=(4,))
    dataset = load_cc3m_dataset(tsv, images)
    assert len(dataset) == 6  # the missing image and the missing target are dropped up front
    assert set(dataset.column_names) == {"caption", "image", "gen_targets_path"}

    collator = GillDataCollator(processor(tmp_path), max_length=16, num_clip_tokens=6)
    batch = collator([dataset[i] for i in range(len(dataset))])
    # The corrupt image and the pickled target (refused by allow_pickle=False) are skipped.
    assert dict(collator.skipped) == {"bad_image": 1, "bad_target": 1} and collator.num_skipped == 2
    assert batch["input_ids"].shape == (4, 16) and batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["gen_targets"].shape == (4, 6, 20)  # cut to num_clip_tokens as the reference does
    expected = np.load(images / "clip_embs" / "00000.png.npy")[:6].astype(np.float32)
    assert torch.equal(batch["gen_targets"][0], torch.from_numpy(expected))
    model = tiny_gill("opt")
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_cc3m_without_targets_and_empty_batches(tmp_path):
    tsv, images = make_cc3m(tmp_path, n=3, corrupt=(0, 1, 2))
    dataset = load_cc3m_dataset(tsv, images, targets_dir=None)
    assert dataset.column_names == ["caption", "image"]
    collator = GillDataCollator(processor(tmp_path), max_length=16)
    with pytest.raises(ValueError, match="Every example of this batch was skipped"):
        collator([dataset[i] for i in range(3)])
    (tmp_path / "bad.tsv").write_text("text\tfile\nx\ty\n")
    with pytest.raises(ValueError, match="header"):
        load_cc3m_dataset(tmp_path / "bad.tsv", images)


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_with_image_and_caption_columns(tmp_path, streaming):
    cells = [{"bytes": png_bytes(i), "path": None} for i in range(4)]
    cells[2] = {"bytes": b"\x89PNG broken", "path": None}
    raw = datasets.Dataset.from_dict({"jpg": cells, "txt": CAPTIONS[:4]}).cast_column("jpg", datasets.Image())
    if streaming:
        raw = raw.to_iterable_dataset()
    dataset = prepare_hf_dataset(raw, image_column="jpg", caption_column="txt")
    collator = GillDataCollator(processor(tmp_path), max_length=16)
    batch = collator(list(dataset))  # iterating must not decode (the broken image would raise)
    assert collator.skipped == {"bad_image": 1}
    assert batch["pixel_values"].shape[0] == 3 and "gen_targets" not in batch


def tiny_text_encoder():
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=320, hidden_size=20, intermediate_size=40, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77)
    return CLIPTextModel(config).eval()


def test_precompute_targets_and_cache_vision_features(tmp_path):
    proc = processor(tmp_path)
    sd_tokenizer = opt_like_tokenizer(tmp_path / "sd")
    sd_tokenizer.model_max_length = 77
    encoder = tiny_text_encoder()
    images = [PIL.Image.open(io.BytesIO(png_bytes(i))) for i in range(4)]
    raw = datasets.Dataset.from_dict({"caption": CAPTIONS[:4], "image": images}).cast_column("image", datasets.Image())
    with_targets = precompute_gen_targets(raw, encoder, sd_tokenizer, batch_size=3)
    targets = np.asarray(with_targets["gen_targets"], dtype=np.float32)
    assert targets.shape == (4, 77, 20)
    ids = sd_tokenizer(CAPTIONS[1], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = encoder(ids).last_hidden_state[0].numpy().astype(np.float16).astype(np.float32)
    assert np.array_equal(targets[1], direct)

    model = tiny_gill("opt", num_clip_tokens=77)
    cached = cache_image_features(prepare_hf_dataset(with_targets), model, proc, batch_size=3)
    assert "image" not in cached.column_names and len(cached) == 4
    collator = GillDataCollator(proc, max_length=16)
    from_cache = collator([cached[i] for i in range(4)])
    from_pixels = collator([with_targets[i] for i in range(4)])
    assert "image_features" in from_cache and "pixel_values" not in from_cache
    with torch.no_grad():
        expected = model.get_image_features(from_pixels["pixel_values"]).pooler_output
        assert torch.allclose(from_cache["image_features"], expected, atol=1e-6)
        a, b = model(**from_cache), model(**from_pixels)
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-5)


def test_precompute_targets_command_saves_a_dataset_that_train_reads(tmp_path):
    from gill_hf.cli import main
    from gill_hf.data import load_saved_or_hub_dataset

    tsv, images = make_cc3m(tmp_path / "data", n=3)
    sd = tmp_path / "sd"
    tiny_text_encoder().half().save_pretrained(sd / "text_encoder")  # SD folders ship fp16 text encoders
    tokenizer = opt_like_tokenizer(tmp_path / "sdtok")
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(sd / "tokenizer")
    main(["precompute-targets", "--train_tsv", str(tsv), "--image_dir", str(images), "--sd_model", str(sd),
          "--batch_size", "2", "--output_dir", str(tmp_path / "saved")])
    saved = load_saved_or_hub_dataset(str(tmp_path / "saved"))
    assert len(saved) == 3 and {"caption", "image", "gen_targets"} <= set(saved.column_names)
    assert np.asarray(saved[0]["gen_targets"]).shape == (77, 20)
    # The stored fp16 weights run in fp32 (same batches as the command), then the targets are rounded to fp16.
    encoder = CLIPTextModel.from_pretrained(str(sd / "text_encoder"), dtype=torch.float32)
    with torch.no_grad():
        expected = np.concatenate([encode_captions_for_sd(saved["caption"][i:i + 2], encoder, tokenizer).numpy()
                                   for i in (0, 2)]).astype(np.float16)
    assert np.array_equal(np.stack([np.asarray(t) for t in saved["gen_targets"]]).astype(np.float16), expected)
    batch = GillDataCollator(processor(tmp_path), max_length=16, num_clip_tokens=6)([saved[i] for i in range(3)])
    assert batch["gen_targets"].shape == (3, 6, 20)


def test_trainer_runs_on_a_streaming_dataset_with_a_corrupt_image(tmp_path):
    from gill_hf.training import GillTrainer, GillTrainingArguments

    cells = [{"bytes": png_bytes(i), "path": None} for i in range(6)]
    cells[1] = {"bytes": b"broken", "path": None}  # the batch of 3 that holds it trains on 2
    raw = datasets.Dataset.from_dict({"image": cells, "caption": CAPTIONS}).cast_column("image", datasets.Image())
    stream = prepare_hf_dataset(raw.to_iterable_dataset())
    collator = GillDataCollator(processor(tmp_path), max_length=16)
    trainer = GillTrainer(model=tiny_gill("opt"), train_dataset=stream, data_collator=collator, args=GillTrainingArguments(
        output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", per_device_train_batch_size=3, max_steps=2,
        logging_steps=1, save_strategy="no", warmup_steps=0, lr_step_size=0, concat_captions_prob=1.0))
    trainer.train()  # an odd batch cannot pair captions: the trainer skips the augmentation for it
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == 2 and logs[-1]["skipped_examples"] == 1
    assert "gen_loss" not in logs[0] and "contrastive_loss" in logs[0]


def test_precompute_fingerprints_follow_the_weights(tmp_path):
    from gill_hf.data import _module_fingerprint

    a, b = tiny_gill("opt", seed=0), tiny_gill("opt", seed=0)
    assert _module_fingerprint(a.vision_model, "x") == _module_fingerprint(b.vision_model, "x")
    with torch.no_grad():
        b.vision_model.post_layernorm.bias.add_(1e-3)
    assert _module_fingerprint(a.vision_model, "x") != _module_fingerprint(b.vision_model, "x")
    assert _module_fingerprint(a.vision_model, "x") != _module_fingerprint(a.vision_model, "y")


def test_trainer_keeps_the_raw_columns_the_collator_reads(tmp_path):
    from transformers import TrainingArguments

    from gill_hf.training import GillTrainer

    collator = GillDataCollator(processor(tmp_path), max_length=16)
    plain = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none")
    assert plain.remove_unused_columns
    trainer = GillTrainer(model=tiny_gill("opt"), args=plain, data_collator=collator,
                          train_dataset=datasets.Dataset.from_dict({"caption": CAPTIONS[:2], "image": [png_bytes(0)] * 2}))
    assert not trainer.args.remove_unused_columns
