"""The paper's benchmarks (`gill-hf eval vist|visdial`): readers on files in VIST's and VisDial's published
schemas (holes, broken files and bad indices included), the metrics against hand computations, FID and
LPIPS with stand-in networks, a run that resumes where it stopped, and the world VIST run end to end at
a reduced size. Budget: about 25 s on 2 cores (the end-to-end run is most of it)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from gill_hf.eval_common import BenchmarkRun, EvalCase, fid_score, format_table, lpips_score, open_rgb, run_generation
from gill_hf.eval_visdial import dialog_text, read_visdial, visdial_cases
from gill_hf.eval_vist import SETTINGS, vist_cases
from gill_hf.metrics import frechet_distance, metric_path, paired_cosine, recall_from_ranks, retrieval_ranks


def solid(colour, size=(24, 16)):
    return PIL.Image.new("RGB", size, colour)


def storylet(story, order, photo, text):
    return [{"story_id": str(story), "storylet_id": f"{story}{order}", "album_id": "a", "photo_flickr_id": str(photo),
             "worker_arranged_photo_order": order, "text": text.lower(), "original_text": text, "tier": "story-in-sequence"}]


@pytest.fixture
def vist_dir(tmp_path):
    """Four stories as the VIST release has them: two complete, one with a missing photo, one with a
    truncated photo file; plus a fifth with only four storylets."""
    images = tmp_path / "images" / "test"
    images.mkdir(parents=True)
    annotations = []
    for story in range(5):
        for order in range(4 if story == 4 else 5):
            photo = 1000 * story + order
            annotations.append(storylet(story, order, photo, f"Story {story} sentence {order}."))
            if story == 2 and order == 3:
                continue  # missing photo
            path = images / f"{photo}.jpg"
            solid((40 * story, 50 * order, 90)).save(path)
            if story == 3 and order == 1:
                path.write_bytes(path.read_bytes()[:20])  # truncated file
    annotations.reverse()  # the release's order is not the story's
    (tmp_path / "sis").mkdir()
    (tmp_path / "sis" / "test.story-in-sequence.json").write_text(json.dumps({"annotations": annotations, "images": [], "albums": []}))
    return tmp_path


def test_vist_cases_follow_the_papers_three_settings(vist_dir):
    cases, pool, skipped = vist_cases(vist_dir)
    assert skipped == {"missing_image": 1, "unreadable_image": 1, "incomplete_story": 1}
    assert sorted(pool) == sorted(str(1000 * s + o) for s in (0, 1) for o in range(5))
    assert [(c.id, c.setting) for c in cases] == [(str(s), setting) for s in (0, 1) for setting in SETTINGS]
    one, five, interleaved = cases[3:6]  # story 1
    sentences = [f"Story 1 sentence {o}." for o in range(5)]
    assert one.prompt == [sentences[4]] and one.text == sentences[4]
    assert five.prompt == sentences and five.text == " ".join(sentences)
    # 4 (image, sentence) pairs in story order, then the 5th sentence; the images stay paths until run
    assert [str(p.name) for p in interleaved.prompt[0:8:2]] == [f"{1000 + o}.jpg" for o in range(4)]
    assert interleaved.prompt[1:8:2] == sentences[:4] and interleaved.prompt[8] == sentences[4]
    assert interleaved.text == " ".join(sentences) and interleaved.target_key == "1004"
    assert open_rgb(interleaved.target).getpixel((0, 0)) == open_rgb(pool["1004"]).getpixel((0, 0))
    assert len(vist_cases(vist_dir, num_stories=1)[0]) == 3


def test_vist_reader_names_bad_files(vist_dir, tmp_path):
    sis = vist_dir / "sis" / "test.story-in-sequence.json"
    sis.write_text(sis.read_text()[:100])
    with pytest.raises(ValueError, match="story-in-sequence"):
        vist_cases(vist_dir)
    with pytest.raises(ValueError, match="no val.story-in-sequence.json"):
        vist_cases(vist_dir, split="val")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "test.story-in-sequence.json").write_text(json.dumps({"annotations": [storylet(0, 0, 1, "A.")]}))
    with pytest.raises(ValueError, match="no complete story"):
        vist_cases(tmp_path / "empty")


@pytest.fixture
def visdial_dir(tmp_path):
    questions = ["is it sunny", "how many dogs", "any people"] + [f"question {i}" for i in range(10)]
    answers = ["yes", "two", "no"] + [f"answer {i}" for i in range(10)]
    dialogs = []
    for image_id in (7, 8, 9):
        rounds = [{"question": i % len(questions), "answer": (i + 1) % len(answers), "answer_options": [0, 1]} for i in range(10)]
        dialogs.append({"image_id": image_id, "caption": f"a photo number {image_id}", "dialog": rounds})
        if image_id != 9:  # image 9 is missing
            solid((image_id * 20, 0, 0)).save(tmp_path / f"VisualDialog_val2018_{image_id:012d}.jpg")
    payload = {"version": "1.0", "split": "val", "data": {"questions": questions, "answers": answers, "dialogs": dialogs}}
    (tmp_path / "visdial_1.0_val.json").write_text(json.dumps(payload))
    return tmp_path


def test_visdial_cases_caption_plus_1_5_10_rounds(visdial_dir):
    cases, pool, skipped = visdial_cases(visdial_dir)
    assert skipped == {"missing_image": 1} and sorted(pool) == ["7", "8"]
    assert [c.setting for c in cases[:3]] == ["caption + 1 round", "caption + 5 rounds", "caption + 10 rounds"]
    assert cases[0].prompt == [cases[0].text] == ["a photo number 7. Q: is it sunny? A: two."]
    assert cases[1].text.count("Q: ") == 5 and cases[2].text.count("Q: ") == 10
    assert all(c.target_key == c.id for c in cases) and {c.id for c in cases} == {"7", "8"}


def test_visdial_reader_names_bad_files(visdial_dir):
    path = visdial_dir / "visdial_1.0_val.json"
    data = json.loads(path.read_text())
    data["data"]["dialogs"][1]["dialog"][2]["answer"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="dialog 1 \\(image 8\\).*out of range"):
        read_visdial(path)
    path.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match="not a VisDial v1.0 file"):
        read_visdial(path)


def test_visdial_test_split_stops_at_the_unanswered_round(tmp_path):
    path = tmp_path / "visdial_1.0_test.json"
    path.write_text(json.dumps({"data": {"questions": ["q0", "q1"], "answers": ["a0"], "dialogs": [
        {"image_id": 1, "caption": "c", "dialog": [{"question": 0, "answer": 0}, {"question": 1}]}]}}))
    assert read_visdial(path) == [{"image_id": 1, "caption": "c", "rounds": [("q0", "a0")]}]
    assert dialog_text("a cat.", [("is it black?", "yes."), ("any toys", "no")]) == "a cat. Q: is it black? A: yes. Q: any toys? A: no."


def test_metrics_match_hand_computations():
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, 5.0]])
    assert paired_cosine(a, b).tolist() == pytest.approx([24 / 25, 0.0])
    with pytest.raises(ValueError):
        paired_cosine(a, b[:1])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    ranks = retrieval_ranks(queries, pool, [2, 1, 0])
    # query 0: pool 0 (1.0) beats target 2 (0.994) -> rank 1; query 1: exact -> 0;
    # query 2: pool 2 (0.781) beats target 0 (0.707) and pool 1 ties it (ties count against) -> rank 2
    assert ranks.tolist() == [1, 0, 2]
    assert recall_from_ranks(ranks, (1, 2, 3)) == {"r@1": pytest.approx(1 / 3), "r@2": pytest.approx(2 / 3), "r@3": 1.0}
    import evaluate

    metric = evaluate.load(metric_path("clip_similarity"))
    assert metric.compute(predictions=a.tolist(), references=b.tolist())["clip_similarity"] == pytest.approx(12 / 25)


def test_frechet_distance_against_closed_forms():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, generator=generator, dtype=torch.float64)
    y = 2 + 3 * torch.randn(300, 1, generator=generator, dtype=torch.float64)
    var_x, var_y = x.var().item(), y.var().item()
    expected = (x.mean() - y.mean()).item() ** 2 + var_x + var_y - 2 * math.sqrt(var_x * var_y)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    # full covariances: Tr((S_a S_b)^1/2) = Tr((S_a^1/2 S_b S_a^1/2)^1/2), the symmetric form, computed with eigh
    a = torch.randn(500, 4, generator=generator, dtype=torch.float64) @ torch.randn(4, 4, generator=generator, dtype=torch.float64)
    b = torch.randn(500, 4, generator=generator, dtype=torch.float64) @ torch.randn(4, 4, generator=generator, dtype=torch.float64) + 1
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-7)
    with pytest.raises(ValueError, match="n >= 2"):
        frechet_distance(x[:1], y)


def test_fid_and_lpips_take_any_network():
    generated = [solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))]
    real = [solid((255, 0, 0)), solid((0, 0, 255)), solid((0, 0, 255))]

    def mean_colour(images):
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float64).mean((0, 1)) for im in images]))

    assert fid_score(generated, real, mean_colour) == pytest.approx(frechet_distance(mean_colour(generated), mean_colour(real)))
    assert fid_score(real, real, mean_colour) == pytest.approx(0.0, abs=1e-6)
    # mean absolute difference in [-1, 1] units: pair 2 differs by 2 in two of three channels -> 4/3; others 0
    distance = lambda x, y: (x - y).abs().mean(dim=(1, 2, 3))  # noqa: E731
    assert lpips_score(generated, real, distance, size=8) == pytest.approx((4 / 3) / 3)


class CountingPipe:
    """Stand-in GILL pipeline and baseline: a colour from the prompt's length, calls counted; raises
    on the call numbered `fail_at` (an interrupted run)."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, prompt, generator, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        colours = [solid((min(255, 10 * len(str(p))), 100, int(g.initial_seed() % 200))) for p, g in zip(prompt, generator)]
        return argparse.Namespace(images=[[c] for c in colours] if "force_image" in kwargs else colours)


class ColourScorer:
    def embed(self, images):
        return torch.tensor(np.stack([np.asarray(open_rgb(im), dtype=np.float32).mean((0, 1)) + 1 for im in images]))


def test_a_run_resumes_where_it_stopped_and_reports_seed_spread(tmp_path):
    cases = [EvalCase(f"c{i}", setting, ["text " * i], "text " * i, solid((20 * i, 100, 50)), f"c{i}")
             for i in range(5) for setting in ("one", "two")]
    meta = {"benchmark": "test", "seeds": [0, 1]}
    pipe = CountingPipe(fail_at=3)
    run = BenchmarkRun(tmp_path, meta)
    with pytest.raises(KeyboardInterrupt):
        run_generation(run, cases, pipe, CountingPipe(), ColourScorer(), [0, 1], steps=1, guidance=1.0, batch_size=4)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sum(len(c) for s in saved["generation"].values() for c in s.values()) == 8  # two batches of four kept

    resumed, pipe = BenchmarkRun(tmp_path, meta), CountingPipe()
    run_generation(resumed, cases, pipe, CountingPipe(), ColourScorer(), [0, 1], steps=1, guidance=1.0, batch_size=4)
    assert pipe.calls == 3  # the 12 remaining cases in batches of 4
    lines = [json.loads(line) for line in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and len({(l["id"], l["setting"], l["seed"]) for l in lines}) == 20
    assert all(PIL.Image.open(l["images"]["gill"]).size == (24, 16) for l in lines)

    rows = {(r["setting"], r["system"]): r for r in resumed.table()}
    per_seed = [np.mean([resumed.generation["one"][str(s)][f"c{i}"]["gill"] for i in range(5)]) for s in (0, 1)]
    assert rows["one", "gill"]["clip_similarity"] == pytest.approx(np.mean(per_seed))
    assert rows["one", "gill"]["seed_std"] == pytest.approx(np.std(per_seed)) and rows["one", "gill"]["n"] == 10
    assert "| one | gill |" in format_table(resumed.table())
    with pytest.raises(ValueError, match="other settings"):
        BenchmarkRun(tmp_path, {"benchmark": "test", "seeds": [0]})


def test_world_vist_runs_end_to_end(tmp_path):
    """`gill-hf world export-vist` then `gill-hf eval vist` on GILL-tiny with 2 stories, 2 diffusion steps."""
    from gill_hf.cli import main

    main(["world", "export-vist", str(tmp_path / "vist"), "--num-stories", "2"])
    cases, pool, skipped = vist_cases(tmp_path / "vist")
    assert len(cases) == 6 and len(pool) == 10 and not skipped
    main(["eval", "vist", str(tmp_path / "vist"), "--clip", "world", "--output-dir", str(tmp_path / "out"),
          "--steps", "2", "--batch-size", "6"])
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert {(r["setting"], r["system"]) for r in table} == {(s, system) for s in SETTINGS for system in ("gill", "baseline")} | {
        ("5 captions + 4 images", "gill retrieval")}
    for row in table:
        assert row["n"] == 2
        if "clip_similarity" in row:
            assert -1 <= row["clip_similarity"] <= 1
        else:
            assert row["pool_size"] == 10 and 0 <= row["r@1"] <= row["r@5"] <= row["r@10"] == 1.0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["stories"] == 2 and results["meta"]["steps"] == 2 and results["meta"]["wall_s"] > 0


def test_the_baselines_cut_prompts_are_counted_once_and_its_per_batch_warning_is_silenced(tmp_path, capsys):
    from diffusers.utils import logging as diffusers_logging

    class WordTokenizer:  # one id per word; the baseline's encoder keeps 3
        model_max_length = 3

        def __call__(self, text):
            return argparse.Namespace(input_ids=list(range(len(text.split()))))

    seen = []

    class WarningBaseline(CountingPipe):
        tokenizer = WordTokenizer()

        def __call__(self, prompt, generator, **kwargs):
            seen.append(diffusers_logging.get_verbosity())
            return super().__call__(prompt, generator, **kwargs)

    cases = [EvalCase(f"c{i}", "one", ["w " * i], "w " * i, solid((20 * i, 100, 50)), f"c{i}") for i in range(1, 6)]
    before = diffusers_logging.get_verbosity()
    run_generation(BenchmarkRun(tmp_path, {"benchmark": "test", "seeds": [0]}), cases, CountingPipe(), WarningBaseline(),
                   ColourScorer(), [0], steps=1, guidance=1.0, batch_size=2)
    assert "keeps the first 3 tokens: 2 of 5 prompts are cut" in capsys.readouterr().out  # 4 and 5 words
    assert seen == [diffusers_logging.ERROR] * 3 and diffusers_logging.get_verbosity() == before
