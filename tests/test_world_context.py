"""The world's context-dependent kinds: determinism, the split rules (test phrasings and the test-only
kind never in training, no held-out pair anywhere) and exact labels (the judge reads every target
image as its labels say). Budget: ~5 s."""

import re

import pytest

from gill_hf.world.context import (COMPOSED_PHRASES, DIALOGUE_EDITS, IMAGE_KINDS, PHRASES, SPLITS, TEST_ONLY_KINDS,
                                   TRAIN_KINDS, WIDE_PHRASES, generate_context_dataset, sample_context_example,
                                   template_pattern, to_row)
from gill_hf.world.render import HELDOUT_PAIRS


class Template:
    """A stand-in chat template (the world renders dialogues with the LM's own)."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, continue_final_message=False):
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}>" for m in messages) + " <assistant>"


def _rows(split, n, seed=0, phrasing="base"):
    return [to_row(sample_context_example(seed, split, i, phrasing), Template()) for i in range(n)]


def test_same_seed_same_examples_and_other_seeds_differ():
    a, b = _rows("train", 30), _rows("train", 30)
    assert a == b
    assert [r["context_text"] for r in _rows("train", 30, seed=1)] != [r["context_text"] for r in a]
    dataset = generate_context_dataset(8, "validation", 0, chat_template_tokenizer=Template())
    assert dataset[0]["target_image"].size == (32, 32) and dataset.column_names[:3] == ["segments", "target_caption", "target_image"]
    with pytest.raises(ValueError, match="unknown split"):
        sample_context_example(0, "heldout", 0)


def test_test_phrasings_and_the_test_only_kind_never_occur_in_training():
    training = _rows("train", 260) + _rows("validation", 130)
    assert {r["kind"] for r in training} == set(TRAIN_KINDS)
    test = _rows("context_test", 140)
    assert set(TEST_ONLY_KINDS) <= {r["kind"] for r in test}
    test_patterns = [template_pattern(t) for key, (_, tests) in PHRASES.items() for t in tests]
    for row in training:
        for pattern in test_patterns:
            assert not pattern.search(row["context_text"]), (pattern.pattern, row["context_text"])
    # Every test example uses at least one test phrasing.
    assert all(any(p.search(r["context_text"]) for p in test_patterns) for r in test)


def test_the_wide_pool_adds_training_phrasings_only():
    """`phrasing="wide"`: train / validation instructions also come from WIDE_PHRASES, never a test
    phrasing; `context_test` is the same either way; the base pool never says a wide phrasing."""
    test_patterns = [template_pattern(t) for _, tests in PHRASES.values() for t in tests]
    wide_patterns = [template_pattern(t) for phrasings in WIDE_PHRASES.values() for t in phrasings]
    assert not set(t for p in WIDE_PHRASES.values() for t in p) & set(t for p in PHRASES.values() for pool in p for t in pool)
    wide = _rows("train", 200, phrasing="wide") + _rows("validation", 100, phrasing="wide")
    assert not any(p.search(r["context_text"]) for r in wide for p in test_patterns)
    used = {p.pattern for r in wide for p in wide_patterns if p.search(r["context_text"])}
    assert len(used) >= len(wide_patterns) // 2  # the pool is drawn from, not just present
    assert not any(p.search(r["context_text"]) for r in _rows("train", 200) for p in wide_patterns)
    assert _rows("context_test", 40, phrasing="wide") == _rows("context_test", 40)
    with pytest.raises(ValueError, match="unknown phrasing 'broad'"):
        sample_context_example(0, "train", 0, "broad")


def test_the_composed_pool_says_each_edit_hundreds_of_ways_none_a_test_phrasing():
    """`phrasing="composed"`: half of the edit instructions come from COMPOSED_PHRASES (opener x
    instruction x ending), from which every saying a test phrasing's pattern finds is dropped; the
    other kinds' rows are those of the wide pool, and `context_test` is unchanged."""
    test_patterns = [template_pattern(t) for _, tests in PHRASES.values() for t in tests]
    test_patterns += [template_pattern(t) for t in DIALOGUE_EDITS[1].values()]
    assert set(COMPOSED_PHRASES) <= set(IMAGE_KINDS)
    for sayings in COMPOSED_PHRASES.values():
        assert len(set(sayings)) >= 400 and not any(p.search(s) for s in sayings for p in test_patterns)
    # Composable from the parts, but a test phrasing (and so is any longer saying that contains it): dropped.
    assert not any(s.startswith("Turn it into") for s in COMPOSED_PHRASES["edit-shape"])
    assert "Now draw it {size} instead." not in COMPOSED_PHRASES["edit-size"]
    composed, wide = _rows("train", 300, phrasing="composed"), _rows("train", 300, phrasing="wide")
    assert not any(p.search(r["context_text"]) for r in composed for p in test_patterns)
    assert all(c == w for c, w in zip(composed, wide) if c["kind"] not in COMPOSED_PHRASES)
    edits = [r for r in composed if r["kind"] in COMPOSED_PHRASES]
    wide_sayings = {kind: [re.compile(template_pattern(t).pattern + "$", re.IGNORECASE) for t in PHRASES[kind][0] + WIDE_PHRASES[kind]]
                    for kind in COMPOSED_PHRASES}
    new = [r for r in edits if not any(p.match(r["context_text"]) for p in wide_sayings[r["kind"]])]
    assert 0.3 < len(new) / len(edits) < 0.7  # drawn half the time (a few composed sayings are also wide ones)
    assert _rows("context_test", 40, phrasing="composed") == _rows("context_test", 40)


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
