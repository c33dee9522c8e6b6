"""`gill-hf train-retrieval`: the refit's loss is the training forward's contrastive loss, the
[IMG0] features do not depend on padding, the fit learns and touches nothing but the retrieval
heads, bad arguments fail clearly, and the command saves a model that reloads with its metrics."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from test_cli import tiny_checkpoint
from test_training import one_thread  # noqa: F401 (autouse: one torch thread)

from gill_hf import GillForConditionalGeneration, GillProcessor
from gill_hf import retrieval_training
from gill_hf.cli import main
from gill_hf.data import GillDataCollator
from gill_hf.retrieval_training import (RETRIEVAL_PARAMETERS, RetrievalFeatures, compute_features, contrastive_loss,
                                        evaluate_recall, fit_retrieval_heads, img0_states)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]


def image_dataset(n, seed):
    rng = np.random.default_rng(seed)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    captions = [f"a {COLOURS[i % 6]} {SHAPES[(i // 6) % 4]} number {i}" for i in range(n)]
    return datasets.Dataset.from_dict({"image": images, "caption": captions}).cast_column("image", datasets.Image())


def load(folder):
    return GillForConditionalGeneration.from_pretrained(str(folder)).eval(), GillProcessor.from_pretrained(str(folder))


def test_refit_loss_equals_the_training_forward_contrastive_loss(tmp_path):
    model, processor = load(tiny_checkpoint(tmp_path / "model"))
    dataset = image_dataset(6, seed=0)
    features = compute_features(model, processor, dataset, batch_size=4, max_length=24)
    batch = GillDataCollator(processor, max_length=24)([dataset[i] for i in range(6)])
    with torch.no_grad():
        expected = model(**batch).contrastive_loss
        assert contrastive_loss(model, features).item() == pytest.approx(expected.item(), rel=1e-5)


def test_img0_states_do_not_depend_on_padding(tmp_path):
    model, processor = load(tiny_checkpoint(tmp_path / "model"))
    captions = ["a red circle", "a much longer caption about a green square at the top left", "a star"]
    one_by_one = img0_states(model, processor, captions, batch_size=1)
    together = img0_states(model, processor, captions, batch_size=3)
    assert one_by_one.shape == (3, model.config.text_config.hidden_size)
    assert torch.allclose(one_by_one, together, atol=1e-5)
    assert not torch.allclose(one_by_one[0], one_by_one[2], atol=1e-3)  # the caption reaches [IMG0]


def synthetic_features(model, n, seed):
    """Text states and image features sharing a latent code, so a linear pair of heads can match them."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=generator)
    text_map = torch.randn(8, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(100))
    image_map = torch.randn(8, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(101))
    noise = lambda d: 0.1 * torch.randn(n, d, generator=generator)  # noqa: E731
    return RetrievalFeatures(latent @ text_map + noise(text_map.shape[1]), latent @ image_map + noise(image_map.shape[1]))


def test_fit_learns_and_touches_only_the_retrieval_heads(tmp_path):
    model, _ = load(tiny_checkpoint(tmp_path / "model"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    train, held_out = synthetic_features(model, 256, seed=0), synthetic_features(model, 64, seed=1)
    result = fit_retrieval_heads(model, train, held_out, batch_size=64, steps=150, learning_rate=1e-2, logging_steps=50)
    assert result.eval_before["t2i_r1"] < 0.2 < 0.8 < result.eval_after["t2i_r1"], (result.eval_before, result.eval_after)
    assert [s for s, _ in result.losses] == [1, 50, 100, 150] and result.losses[-1][1] < 0.1 * result.losses[0][1]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[0] in RETRIEVAL_PARAMETERS for k in changed), changed
    assert {k.split(".")[0] for k in changed} == set(RETRIEVAL_PARAMETERS)
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert evaluate_recall(model, held_out) == pytest.approx(result.eval_after)

    again, _ = load(tmp_path / "model")
    fit_retrieval_heads(again, train, batch_size=64, steps=150, learning_rate=1e-2)
    assert torch.equal(again.text_retrieval_projection.weight, model.text_retrieval_projection.weight)  # seeded


def user_error(argv, capsys) -> str:
    """The command's user error: exit status 2 and one `error:` line (the message returned)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_arguments_fail_clearly_and_leave_the_model_as_it_was(tmp_path, monkeypatch, capsys):
    folder = tiny_checkpoint(tmp_path / "model")
    model, _ = load(folder)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = synthetic_features(model, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        fit_retrieval_heads(model, train, batch_size=11)
    with pytest.raises(ValueError, match="steps"):
        fit_retrieval_heads(model, train, batch_size=4, steps=0)
    with pytest.raises(ValueError, match="logging_steps"):
        fit_retrieval_heads(model, train, batch_size=4, logging_steps=0)
    with pytest.raises(ValueError, match="eval_features"):  # widths of another model's features
        fit_retrieval_heads(model, train, RetrievalFeatures(torch.zeros(5, 7), torch.zeros(5, 24)), batch_size=4)
    with pytest.raises(ValueError, match="text states"):
        RetrievalFeatures(torch.zeros(3, 32), torch.zeros(4, 24))
    with pytest.raises(ValueError, match="captions"):
        img0_states(model, None, [])

    def failing_loss(*args):  # fails inside the fit, after the retrieval heads were unfrozen
        raise RuntimeError("boom")

    monkeypatch.setattr(retrieval_training, "contrastive_loss", failing_loss)
    with pytest.raises(RuntimeError, match="boom"):
        fit_retrieval_heads(model, train, batch_size=4, steps=3)
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    # The command checks its arguments before the feature pass, and refuses what it would save wrongly.
    common = ["train-retrieval", "--model_name_or_path", str(folder), "--dataset_name", str(tmp_path / "none"),
              "--output_dir", str(tmp_path / "out")]
    for extra, match in ((["--batch_size", "1"], "batch_size"), (["--logging_steps", "0"], "logging_steps"),
                         (["--max_train_samples", "8", "--batch_size", "16"], "max_train_samples")):
        assert match in user_error(common + extra, capsys)
    # a full-form save would write bf16 backbones
    assert "adapter-form" in user_error(common + ["--backbone_dtype", "bfloat16"], capsys)
    assert not (tmp_path / "out").exists()


def test_command_saves_a_model_that_reloads_with_its_metrics(tmp_path):
    folder = tiny_checkpoint(tmp_path / "model")
    datasets.DatasetDict({"train": image_dataset(48, seed=0), "validation": image_dataset(12, seed=1)}).save_to_disk(
        str(tmp_path / "data"))
    out = tmp_path / "refit"
    main(["train-retrieval", "--model_name_or_path", str(folder), "--dataset_name", str(tmp_path / "data"),
          "--eval_split", "validation", "--output_dir", str(out), "--batch_size", "16", "--steps", "40",
          "--learning_rate", "1e-2", "--logging_steps", "20", "--max_length", "24"])
    metrics = json.loads((out / "retrieval_metrics.json").read_text())
    assert metrics["num_pairs"] == 48 and [s for s, _ in metrics["losses"]] == [1, 20, 40]
    original, _ = load(folder)
    refit, processor = load(out)
    for name, param in original.state_dict().items():
        same = torch.equal(param, refit.state_dict()[name])
        assert same != (name.split(".")[0] in RETRIEVAL_PARAMETERS), name
    evaluation = compute_features(refit, processor, image_dataset(12, seed=1), max_length=24)
    assert evaluate_recall(refit, evaluation) == pytest.approx(metrics["eval_after"])
    assert evaluate_recall(original, evaluation) == pytest.approx(metrics["eval_before"])
