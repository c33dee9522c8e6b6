"""Decision head: features from prompts, full-batch training to a separable set's macro-F1, both
head variants saved into the model and reloaded, and `gill-hf train-decision` end to end."""

import json

import pytest
import torch
from test_training import one_thread  # noqa: F401 (autouse: one torch thread)
from tiny_models import tiny_gill
from tiny_tokenizers import opt_like_tokenizer, tiny_image_processor

from gill_hf import GillForConditionalGeneration, GillProcessor
from gill_hf.cli import main
from gill_hf.decision import decision_features, load_labelled_prompts, train_decision_head
from gill_hf.metrics import macro_f1


SUBJECTS = ["a dog", "the cat", "a red car", "two birds", "an old man", "the small house", "a girl", "my friend"]
PLACES = ["the park", "a wooden table", "the beach", "a green field", "the river", "a busy street"]


def labelled_prompts(path):
    """"Draw ..." prompts want a generated image, "Show me a photo of ..." ones a retrieved one;
    shuffled deterministically so that both splits hold both classes. 'same' rows are skipped."""
    rows = []
    for i, subject in enumerate(SUBJECTS):
        for j, place in enumerate(PLACES):
            rows.append((f"Draw {subject} near {place} at night.", "generate"))
            rows.append((f"Show me a photo of {subject} near {place}.", "retrieve"))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    lines = ["text\tdecision"] + [f"{rows[i][0]}\t{rows[i][1]}" for i in order] + ["Anything at all.\tsame"]
    path.write_text("\n".join(lines) + "\n")
    return path


def checkpoint(folder):
    """At random init (std 0.02) the tiny LM mixes little of the prompt into the [IMG0] state (a
    head on it reaches macro-F1 ~0.84 here); its layer matrices are scaled 4x so that the wording
    reaches [IMG0], as in a real LM (F1 1.0)."""
    model = tiny_gill("opt", seed=0)
    with torch.no_grad():
        for name, param in model.language_model.named_parameters():
            if ".layers." in name and param.ndim == 2:
                param.mul_(4)
    model.save_pretrained(folder)
    GillProcessor(image_processor=tiny_image_processor(), tokenizer=opt_like_tokenizer(folder / "tok")).save_pretrained(folder)
    return folder


def test_head_reaches_high_macro_f1_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=generator)
    features = torch.randn(200, 32, generator=generator) + 1.5 * (2 * labels[:, None] - 1) * torch.ones(32) / 32**0.5 * 3
    config = tiny_gill("opt").config
    config.decision_head_type = "hidden"
    result = train_decision_head(features, labels, config, num_train=150, steps=300)
    assert result.eval_f1 >= 0.9 and result.train_f1 >= 0.9
    again = train_decision_head(features, labels, config, num_train=150, steps=300)
    assert torch.equal(result.head.linear.weight, again.head.linear.weight)  # seeded
    assert macro_f1(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])) == pytest.approx((0.8 + 2 / 3) / 2)


def test_standardised_training_uses_a_score_feature_on_its_own_scale():
    """The "hidden_and_score" situation: one informative column far from zero with the classes a
    few units apart (a scaled retrieval score), beside uninformative unit-scale columns. Raw
    features cannot use it in 2000 steps at lr 1e-3; standardised ones can, and the folded head
    reads raw features."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=generator)
    score = 60 + 4 * labels + torch.randn(400, generator=generator)
    features = torch.cat([torch.randn(400, 32, generator=generator), score[:, None]], dim=1)
    config = tiny_gill("opt").config
    config.decision_head_type = "hidden_and_score"
    folded = train_decision_head(features, labels, config, num_train=300)
    raw = train_decision_head(features, labels, config, num_train=300, standardize=False)
    assert folded.eval_f1 >= 0.9 > 0.75 >= raw.eval_f1, (folded.eval_f1, raw.eval_f1)
    # The fold is exact: the saved head on raw features = a head trained on standardised ones, in eval mode.
    mean, std = features[:300].mean(0), features[:300].std(0, correction=0)
    on_scaled = train_decision_head((features - mean) / std, labels, config, num_train=300, standardize=False)
    with torch.no_grad():
        assert torch.allclose(folded.head(features), on_scaled.head((features - mean) / std), atol=1e-4)
    constant = torch.cat([features, torch.full((400, 1), 3.0)], dim=1)  # a constant column is left unscaled
    config.text_config.hidden_size += 1
    assert train_decision_head(constant, labels, config, num_train=300).eval_f1 == pytest.approx(folded.eval_f1, abs=0.02)


@pytest.mark.parametrize("head_type", ["hidden", "hidden_and_score"])
def test_train_decision_command_saves_and_reloads_both_variants(tmp_path, head_type):
    model_dir = checkpoint(tmp_path / "model")
    prompts = labelled_prompts(tmp_path / "prompts.tsv")
    texts, labels = load_labelled_prompts(prompts)
    assert len(texts) == 2 * len(SUBJECTS) * len(PLACES)  # the 'same' row is skipped
    argv = ["train-decision", "--model_name_or_path", str(model_dir), "--prompts", str(prompts),
            "--output_dir", str(tmp_path / "out"), "--head_type", head_type]  # reference: 2000 steps, lr 1e-3
    index = None
    if head_type == "hidden_and_score":
        from gill_hf.retrieval import GillRetrievalIndex

        index = torch.nn.functional.normalize(torch.randn(20, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
        GillRetrievalIndex.from_embeddings(index, references=[f"{i}.png" for i in range(20)]).save_pretrained(tmp_path / "index")
        argv += ["--retrieval_embeddings", str(tmp_path / "index")]
    main(argv)
    metrics = json.loads((tmp_path / "out" / "decision_metrics.json").read_text())
    assert metrics["eval_macro_f1"] >= 0.9, metrics

    reloaded = GillForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert reloaded.config.decision_head_type == head_type
    assert not any(p.requires_grad for p in reloaded.decision_head.parameters())
    processor = GillProcessor.from_pretrained(tmp_path / "out")
    features = decision_features(reloaded, processor, texts[:6], head_type, index)
    hidden, scores = features[:, :32], (features[:, 32] if head_type == "hidden_and_score" else None)
    probs = reloaded.get_decision_probs(hidden, scores)
    predictions = probs.argmax(-1).tolist()
    assert sum(p == l for p, l in zip(predictions, labels[:6])) >= 5
    assert torch.allclose(probs.sum(-1), torch.ones(6))


def test_bad_inputs(tmp_path):
    (tmp_path / "p.tsv").write_text("text\tdecision\nhello\tmaybe\n")
    with pytest.raises(ValueError, match="decision must be one of"):
        load_labelled_prompts(tmp_path / "p.tsv")
    config = tiny_gill("opt").config
    config.decision_head_type = "hidden"
    with pytest.raises(ValueError, match="steps"):
        train_decision_head(torch.randn(4, 32), [0, 1, 0, 1], config, steps=0)
    with pytest.raises(ValueError, match="takes 32 features"):
        train_decision_head(torch.randn(4, 33), [0, 1, 0, 1], config, steps=1)
    with pytest.raises(ValueError, match="retrieval_embeddings"):
        decision_features(tiny_gill("opt"), None, ["x"], "hidden_and_score")
