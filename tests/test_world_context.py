"""The world's context-dependent kinds: determinism, the split rules (test phrasings and the test-only
kind never in training, no held-out pair anywhere) and exact labels (the judge reads every target
image as its labels say). Budget: ~5 s."""

import re

import pytest

from gill_hf.world.context import (PHRASES, SPLITS, TEST_ONLY_KINDS, TRAIN_KINDS, generate_context_dataset,
                                   sample_context_example, to_row)
from gill_hf.world.render import HELDOUT_PAIRS


class Template:
    """A stand-in chat template (the world renders dialogues with the LM's own)."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, continue_final_message=False):
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}>" for m in messages) + " <assistant>"


def _rows(split, n, seed=0):
    return [to_row(sample_context_example(seed, split, i), Template()) for i in range(n)]


def test_same_seed_same_examples_and_other_seeds_differ():
    a, b = _rows("train", 30), _rows("train", 30)
    assert a == b
    assert [r["context_text"] for r in _rows("train", 30, seed=1)] != [r["context_text"] for r in a]
    dataset = generate_context_dataset(8, "validation", 0, chat_template_tokenizer=Template())
    assert dataset[0]["target_image"].size == (32, 32) and dataset.column_names[:3] == ["segments", "target_caption", "target_image"]
    with pytest.raises(ValueError, match="unknown split"):
        sample_context_example(0, "heldout", 0)


def _pattern(template: str) -> re.Pattern:
    """A phrasing template as a regex: its literal parts, any text in its slots."""
    return re.compile(".+?".join(re.escape(part) for part in re.split(r"\{[^}]+\}", template)), re.IGNORECASE)


def test_test_phrasings_and_the_test_only_kind_never_occur_in_training():
    training = _rows("train", 260) + _rows("validation", 130)
    assert {r["kind"] for r in training} == set(TRAIN_KINDS)
    test = _rows("context_test", 140)
    assert set(TEST_ONLY_KINDS) <= {r["kind"] for r in test}
    test_patterns = [_pattern(t) for key, (_, tests) in PHRASES.items() for t in tests]
    for row in training:
        for pattern in test_patterns:
            assert not pattern.search(row["context_text"]), (pattern.pattern, row["context_text"])
    # Every test example uses at least one test phrasing.
    assert all(any(p.search(r["context_text"]) for p in test_patterns) for r in test)


@pytest.mark.parametrize("split", SPLITS)
def test_no_split_uses_a_held_out_pair(split):
    for row in _rows(split, 150):
        assert (row["shape"], row["colour"]) not in HELDOUT_PAIRS


def test_the_judge_reads_every_target_as_labelled():
    from gill_hf.world.judge import load_judge
    from gill_hf.world.scoring import read_single_objects

    rows = _rows("context_test", 70)
    readings = read_single_objects(load_judge(), [_decode(r["target_image"]) for r in rows])
    for row, seen in zip(rows, readings):
        assert {k: row[k] for k in ("shape", "colour", "size", "position")} == {k: seen[k] for k in ("shape", "colour", "size", "position")}
        assert seen["count"] == 1
        assert row["target_caption"] == f"{'an' if row['size'][0] in 'aeiou' else 'a'} {row['size']} {row['colour']} {row['shape']}" \
                                        + row["target_caption"].split(row["shape"], 1)[1]


def _decode(cell):
    import io

    import PIL.Image

    return PIL.Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
