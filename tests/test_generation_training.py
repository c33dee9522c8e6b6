"""`gill-hf train-generation`: the refit's loss is the training forward's generation loss, the [IMG]
block states do not depend on batching, the fit learns and touches nothing but the mapper, bad
arguments fail before any work, and the command saves a model that reloads with its metrics.
Budget: ~3 s on 2 cores (measured 2026-12-05)."""

import json

import datasets
import numpy as np
import pytest
import torch
from test_cli import tiny_checkpoint
from test_interleaved import _png
from test_training import one_thread  # noqa: F401 (autouse: one torch thread)

from gill_hf import GillForConditionalGeneration, GillProcessor
from gill_hf.cli import main
from gill_hf.data import GillDataCollator, prepare_hf_dataset, prepare_interleaved_dataset
from gill_hf.generation_training import (GENERATION_PARAMETERS, GenerationFeatures, block_states, evaluate_generation,
                                         fit_generation_mapper, mapper_loss)
from gill_hf.interleaved import image_segment, interleaved_example, text_segment
from gill_hf.modeling import GillMapper

WORDS = ["red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "star"]


def load(folder):
    return GillForConditionalGeneration.from_pretrained(str(folder)).eval(), GillProcessor.from_pretrained(str(folder))


def caption_rows(n, seed):
    rng = np.random.default_rng(seed)
    return [{"caption": f"a {WORDS[i % 9]} thing number {i}", "image": {"bytes": _png(seed * 1000 + i), "path": None},
             "gen_targets": rng.normal(size=(6, 20)).astype(np.float32)} for i in range(n)]


def interleaved_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        segments = [image_segment(_png(seed * 1000 + 500 + i)), text_segment(f"the same, but {WORDS[(i + 3) % 9]}" + " more" * (i % 4))]
        rows.append({**interleaved_example(segments, f"a {WORDS[(i + 3) % 9]} thing", _png(seed * 1000 + 700 + i) if i % 2 else None),
                     "gen_targets": rng.normal(size=(6, 20)).astype(np.float32)})
    return rows


def as_dataset(rows, interleaved):
    dataset = datasets.Dataset.from_list(rows)
    return prepare_interleaved_dataset(dataset) if interleaved else prepare_hf_dataset(dataset)


def collator_for(processor):
    return GillDataCollator(processor, max_length=24, num_clip_tokens=6, gen_emb_dim=20, interleaved_max_length=48)


def test_refit_loss_is_the_training_forwards_gen_loss_and_states_do_not_depend_on_batching(tmp_path):
    model, processor = load(tiny_checkpoint(tmp_path / "model"))
    collator = collator_for(processor)
    for rows, interleaved in ((caption_rows(5, 0), False), (interleaved_rows(5, 1), True)):
        dataset = as_dataset(rows, interleaved)
        together = block_states(model, collator, dataset, batch_size=5)
        one_by_one = block_states(model, collator, dataset, batch_size=1)
        assert together.states.shape == (5, 8, model.config.text_config.hidden_size)
        assert torch.allclose(together.states, one_by_one.states, atol=1e-5)
        assert torch.equal(together.targets, torch.tensor(np.stack([r["gen_targets"] for r in rows])))
        assert not torch.allclose(together.states[0], together.states[1], atol=1e-3)  # the row reaches the block
        with torch.no_grad():
            expected = model(**collator([dataset[i] for i in range(5)]), concat_captions=0.0).gen_loss
            assert mapper_loss(model, together).item() == pytest.approx(expected.item(), rel=1e-5)


def teacher_features(model, states, seed):
    """Targets a differently initialised mapper gives for `states`: learnable by the model's mapper."""
    torch.manual_seed(seed)
    teacher = GillMapper(model.config).eval()
    rows = model.img_embeddings.detach().expand(len(states), -1, -1)
    with torch.no_grad():
        return GenerationFeatures(states, teacher(states, rows))


def test_fit_learns_and_touches_only_the_mapper(tmp_path):
    model, processor = load(tiny_checkpoint(tmp_path / "model"))
    states = block_states(model, collator_for(processor), as_dataset(caption_rows(40, 2), False), batch_size=20).states
    train, held_out = teacher_features(model, states[:32], 7), teacher_features(model, states[32:], 7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    result = fit_generation_mapper(model, train, {"held_out": held_out}, batch_size=8, steps=120, learning_rate=3e-3,
                                   logging_steps=40)
    assert [s for s, _ in result.losses] == [1, 40, 80, 120]
    assert result.eval_after["held_out"] < 0.6 * result.eval_before["held_out"], (result.eval_before, result.eval_after)
    assert evaluate_generation(model, held_out) == pytest.approx(result.eval_after["held_out"])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and {k.split(".")[0] for k in changed} == set(GENERATION_PARAMETERS), changed
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert not model.mapper.training  # back in eval mode

    again, _ = load(tmp_path / "model")
    fit_generation_mapper(again, train, batch_size=8, steps=120, learning_rate=3e-3)
    assert all(torch.equal(a, b) for a, b in zip(again.mapper.parameters(), model.mapper.parameters()))  # seeded


def user_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "model")
    model, _ = load(folder)
    train = GenerationFeatures(torch.zeros(10, 8, model.config.text_config.hidden_size), torch.zeros(10, 6, 20))
    with pytest.raises(ValueError, match="batch_size"):
        fit_generation_mapper(model, train, batch_size=11)
    with pytest.raises(ValueError, match="steps"):
        fit_generation_mapper(model, train, batch_size=4, steps=0)
    with pytest.raises(ValueError, match="held_out"):  # another model's target width
        fit_generation_mapper(model, train, {"held_out": GenerationFeatures(train.states[:4], torch.zeros(4, 6, 7))}, batch_size=4)
    with pytest.raises(ValueError, match="states"):
        GenerationFeatures(torch.zeros(3, 8, 4), torch.zeros(4, 6, 20))
    common = ["train-generation", "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")]
    assert "--dataset_name" in user_error(common, capsys)
    for extra, match in ((["--batch_size", "1"], "batch_size"), (["--max_interleaved_samples", "0"], "max_interleaved_samples")):
        assert match in user_error(common + ["--dataset_name", str(tmp_path / "none")] + extra, capsys)
    assert not (tmp_path / "out").exists()


def test_command_saves_a_model_that_reloads_with_its_metrics(tmp_path):
    folder = tiny_checkpoint(tmp_path / "model")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(caption_rows(24, 3)),
                          "validation": datasets.Dataset.from_list(caption_rows(8, 4))}).save_to_disk(str(tmp_path / "captions"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(interleaved_rows(16, 5)),
                          "validation": datasets.Dataset.from_list(interleaved_rows(8, 6))}).save_to_disk(str(tmp_path / "context"))
    out = tmp_path / "refit"
    main(["train-generation", "--model_name_or_path", str(folder), "--dataset_name", str(tmp_path / "captions"),
          "--eval_split", "validation", "--interleaved_dataset_name", str(tmp_path / "context"),
          "--interleaved_eval_split", "validation", "--max_interleaved_samples", "12", "--output_dir", str(out),
          "--batch_size", "8", "--steps", "60", "--learning_rate", "3e-3", "--max_length", "24",
          "--interleaved_max_length", "48", "--feature_batch_size", "5"])
    metrics = json.loads((out / "generation_metrics.json").read_text())
    assert metrics["num_rows"] == {"caption": 24, "interleaved": 12} and metrics["skipped"] == {}
    assert set(metrics["eval_gen_loss_after"]) == {"caption", "interleaved"}
    # random targets: the training rows are fit, held-out rows can only move towards their mean
    assert metrics["losses"][-1][1] < metrics["losses"][0][1]
    refit, processor = load(out)
    original, _ = load(folder)
    state, before = refit.state_dict(), original.state_dict()
    changed = {k for k in before if not torch.equal(before[k], state[k])}
    assert changed and {k.split(".")[0] for k in changed} == {"mapper"}
    held_out = block_states(refit, collator_for(processor), as_dataset(interleaved_rows(8, 6), True), batch_size=8)
    assert evaluate_generation(refit, held_out) == pytest.approx(metrics["eval_gen_loss_after"]["interleaved"], rel=1e-5)
