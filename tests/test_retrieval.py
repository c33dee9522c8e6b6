"""GillRetrievalIndex (build, exact top-k against numpy, memory-mapped save/load) and retrieval in
the pipeline (decisions, no repeated image within an answer, save/load)."""

import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

from gill_hf.retrieval import GillRetrievalIndex
from test_pipeline import FAST, images, one_thread, rerun_loop, seeded, tiny_pipeline, tiny_processor  # noqa: F401
from tiny_models import tiny_gill


def image_dataset(n: int = 12, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": images(n, seed=seed, size=24), "caption": [f"image {i}" for i in range(n)]},
                                      features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))


@pytest.fixture
def model():
    return tiny_gill("opt", seed=3)


def numpy_top_k(embeddings: np.ndarray, query: np.ndarray, k: int, exclude=()) -> tuple[np.ndarray, np.ndarray]:
    """Independent exact search over the stored (already normalised) rows, best first."""
    e = embeddings.astype(np.float64)
    q = query.astype(np.float64) / np.linalg.norm(query)
    scores = e @ q
    scores[list(exclude)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], order


def test_build_from_a_dataset_in_batches_equals_one_pass_of_the_image_head(tmp_path, model):
    dataset = image_dataset()
    processor = tiny_processor(tmp_path)
    index = GillRetrievalIndex.build(model, dataset, processor, batch_size=5)
    pixels = processor.image_processor(images=list(dataset["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_retrieval_embeds(pixel_values=pixels)
    assert len(index) == 12 and index.references is None and index.dataset is dataset
    torch.testing.assert_close(index.embeddings, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(index.embeddings.norm(dim=-1), torch.ones(12))
    assert np.array_equal(np.asarray(index.get_image(4)), np.asarray(dataset[4]["image"].convert("RGB")))


def test_build_from_a_folder_indexes_image_files_by_path(tmp_path, model):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images(4, seed=2, size=20)):
        image.save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    index = GillRetrievalIndex.build(model, folder, tiny_processor(tmp_path), batch_size=3)
    assert index.references == [str((folder / f"{i:02d}.png").resolve()) for i in range(4)]
    assert np.array_equal(np.asarray(index.get_image(2)), np.asarray(PIL.Image.open(folder / "02.png").convert("RGB")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_k_equals_numpy_on_the_saved_embeddings_before_and_after_loading(tmp_path, model, dtype):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(50, 16, generator=generator)
    index = GillRetrievalIndex.from_embeddings(embeddings.to(dtype), references=[f"/images/{i}.png" for i in range(50)])
    index.save_pretrained(tmp_path / "index")
    saved = load_numpy(str(tmp_path / "index" / "embeddings.safetensors"))["embeddings"] if dtype != torch.bfloat16 else None
    loaded = GillRetrievalIndex.from_pretrained(tmp_path / "index")
    stored = loaded.embeddings.float().numpy() if saved is None else saved.astype(np.float32)
    queries = torch.randn(4, 16, generator=generator)
    exclude = [3, 17, 41]
    for idx in (index, loaded):
        scores, indices = idx.search(queries, k=5, exclude=exclude)
        for q in range(4):
            ref_scores, ref_indices = numpy_top_k(stored, queries[q].numpy(), 5, exclude)
            assert indices[q].tolist() == ref_indices.tolist()
            np.testing.assert_allclose(scores[q].numpy(), ref_scores, atol=1e-5)
    assert loaded.references == index.references and loaded.embeddings.dtype == dtype


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_loaded_embeddings_are_memory_mapped(tmp_path):
    GillRetrievalIndex.from_embeddings(torch.randn(8, 16), references=[str(i) for i in range(8)]).save_pretrained(tmp_path / "i")
    loaded = GillRetrievalIndex.from_pretrained(tmp_path / "i")
    file = str((tmp_path / "i" / "embeddings.safetensors").resolve())
    address = loaded.embeddings.data_ptr()
    ranges = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(file)]
    assert any(int(lo, 16) <= address < int(hi, 16) for lo, hi in ranges), "the embeddings do not live in the file's mapping"


def test_search_pads_when_fewer_entries_remain_and_accepts_per_query_exclusions():
    index = GillRetrievalIndex.from_embeddings(torch.eye(3, 16), references=["a", "b", "c"])
    scores, indices = index.search(torch.eye(3, 16)[0], k=3, exclude=[1])
    assert indices.tolist() == [0, 2, -1] and scores[0] == pytest.approx(1.0) and torch.isinf(scores[2:]).all()
    # k beyond the index size gives one column per entry, never a k-sized allocation.
    scores, indices = index.search(torch.eye(3, 16)[0], k=10**9)
    assert indices.tolist() == [0, 1, 2] and scores.shape == (3,)
    _, per_query = index.search(torch.eye(3, 16)[:2], k=1, exclude=[[0], [1]])
    assert per_query[:, 0].tolist()[1] != 1 and per_query[0, 0] != 0


def test_dataset_backed_index_round_trips_with_its_images(tmp_path, model):
    dataset = image_dataset(6)
    index = GillRetrievalIndex.build(model, dataset, tiny_processor(tmp_path), batch_size=4)
    index.save_pretrained(tmp_path / "index")
    loaded = GillRetrievalIndex.from_pretrained(tmp_path / "index")
    assert loaded.dataset is not None and len(loaded) == 6
    assert np.array_equal(np.asarray(loaded.get_image(5)), np.asarray(dataset[5]["image"].convert("RGB")))
    assert torch.equal(loaded.embeddings, index.embeddings)


def test_bad_index_inputs(tmp_path):
    index = GillRetrievalIndex.from_embeddings(torch.randn(4, 16), references=list("abcd"))
    with pytest.raises(ValueError, match="query"):
        index.search(torch.randn(2, 8))
    with pytest.raises(ValueError, match="k"):
        index.search(torch.randn(16), k=0)
    with pytest.raises(ValueError, match="exactly one"):
        GillRetrievalIndex.from_embeddings(torch.randn(4, 16))
    with pytest.raises(ValueError, match="4 embeddings but 3"):
        GillRetrievalIndex.from_embeddings(torch.randn(4, 16), references=list("abc"))
    with pytest.raises(TypeError, match="source"):
        GillRetrievalIndex.build(tiny_gill("opt"), 42, tiny_processor(tmp_path))
    index.save_pretrained(tmp_path / "index")
    lines = (tmp_path / "index" / "references.jsonl").read_text().splitlines()
    (tmp_path / "index" / "references.jsonl").write_text("\n".join(lines[:2]))
    with pytest.raises(ValueError, match="references.jsonl.*truncated"):
        GillRetrievalIndex.from_pretrained(tmp_path / "index")
    (tmp_path / "index" / "embeddings.safetensors").unlink()
    with pytest.raises(ValueError, match="embeddings.safetensors"):
        GillRetrievalIndex.from_pretrained(tmp_path / "index")


# ----- retrieval in the pipeline ---------------------------------------------------------------------


def retrieval_pipeline(tmp_path, head="hidden", n_images=10):
    model = tiny_gill("opt", seed=7)
    index = GillRetrievalIndex.build(model, image_dataset(n_images), tiny_processor(tmp_path), batch_size=8)
    return tiny_pipeline(tmp_path, retrieval_index=index, decision_head_type=head)


def set_decision_bias(pipe, generate: float, retrieve: float) -> None:
    with torch.no_grad():
        pipe.gill_model.decision_head.linear.weight.zero_()
        pipe.gill_model.decision_head.linear.bias.copy_(torch.tensor([generate, retrieve]))


BLOCKS = dict(max_new_tokens=30, gen_scale_factor=1e5, max_images=3, force_image=True, num_retrieved=3, **FAST)


def test_image_sources_follow_decision_probs_under_auto(tmp_path):
    pipe = retrieval_pipeline(tmp_path)
    out = pipe(prompt=["A dog", "Two birds on the"], **BLOCKS)
    for probs, sources in zip(out.decision_probs, out.image_sources):
        assert probs.shape == (3, 2)
        assert sources == ["retrieved" if p[1] > p[0] else "generated" for p in probs]
    set_decision_bias(pipe, 0.0, 5.0)
    assert pipe(prompt="A dog", **BLOCKS).image_sources == [["retrieved"] * 3]
    set_decision_bias(pipe, 5.0, 0.0)
    generated = pipe(prompt="A dog", **BLOCKS)
    assert generated.image_sources == [["generated"] * 3] and not torch.isnan(generated.generated_scores[0]).any()


def test_retrieval_scores_equal_the_index_search_and_no_image_repeats_within_an_answer(tmp_path):
    pipe = retrieval_pipeline(tmp_path)
    out = pipe(prompt="A dog", image_source="retrieved", num_images_per_prompt=2, **BLOCKS)
    _, _, hidden = rerun_loop(pipe, "A dog", mode="default", steps=30, gen_scale=1e5, force_image=True, max_images=3)
    with torch.no_grad():
        queries = pipe.gill_model.get_text_retrieval_embeds(hidden)
    seen = []
    for block in range(3):
        scores, indices = pipe.retrieval_index.search(queries[block], k=3, exclude=seen)
        assert out.retrieval_indices[0][block].tolist() == indices.tolist()
        torch.testing.assert_close(out.retrieval_scores[0][block], scores, atol=1e-4, rtol=1e-4)
        seen += indices.tolist()
    assert len(set(seen)) == 9, "a retrieved candidate came back in a later block"
    assert out.image_sources == [["retrieved"] * 6] and out.decision_probs is None
    expected = [np.asarray(pipe.retrieval_index.get_image(int(i))) for row in out.retrieval_indices[0] for i in row[:2]]
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(out.images[0], expected))


def test_more_images_per_block_than_retrieved_candidates_is_an_error(tmp_path):
    pipe = retrieval_pipeline(tmp_path)
    with pytest.raises(ValueError, match="num_retrieved"):
        pipe(prompt="A dog", num_images_per_prompt=4, **BLOCKS)


def test_hidden_and_score_head_gets_the_scaled_best_score(tmp_path):
    pipe = retrieval_pipeline(tmp_path, head="hidden_and_score")
    out = pipe(prompt="A dog", **{**BLOCKS, "max_images": 1})
    _, _, hidden = rerun_loop(pipe, "A dog", mode="default", steps=30, gen_scale=1e5, force_image=True, max_images=1)
    model = pipe.gill_model
    with torch.no_grad():
        best = out.retrieval_scores[0][:, 0] * model.logit_scale.exp()
        expected = model.get_decision_probs(hidden[:, 0], best)
    torch.testing.assert_close(out.decision_probs[0], expected, atol=1e-5, rtol=1e-5)


def test_without_a_decision_head_or_index_auto_means_generated(tmp_path):
    pipe = retrieval_pipeline(tmp_path, head=None)
    out = pipe(prompt="A dog", **{**BLOCKS, "max_images": 1})
    assert out.image_sources == [["generated"]] and out.decision_probs is None and out.retrieval_scores[0].shape == (1, 3)


def test_pipeline_with_an_index_survives_save_and_load(tmp_path):
    pipe = retrieval_pipeline(tmp_path)
    before = pipe(prompt="A dog", generator=seeded(0)[0], output_type="np", **BLOCKS)
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["retrieval_index"] == ["gill_hf.retrieval", "GillRetrievalIndex"]
    from gill_hf.pipelines import GillPipeline

    loaded = GillPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    after = loaded(prompt="A dog", generator=seeded(0)[0], output_type="np", **BLOCKS)
    assert after.image_sources == before.image_sources
    for a, b in zip(after.retrieval_indices + after.decision_probs, before.retrieval_indices + before.decision_probs):
        assert torch.equal(a, b)
    torch.testing.assert_close(after.retrieval_scores[0], before.retrieval_scores[0], atol=1e-6, rtol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(after.images[0], before.images[0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_scan_with_exact_rescoring_equals_float32_search(dtype):
    # Many entries close to the query make near-ties that a 16-bit score alone would misorder.
    generator = torch.Generator().manual_seed(3)
    queries = torch.nn.functional.normalize(torch.randn(12, 64, generator=generator), dim=-1)
    near = queries.repeat_interleave(200, 0) + 0.02 * torch.randn(2400, 64, generator=generator)
    embeddings = torch.cat([near, torch.randn(3000, 64, generator=generator)]).to(dtype)
    index = GillRetrievalIndex.from_embeddings(embeddings, references=[str(i) for i in range(len(embeddings))])
    stored = index.embeddings.float()
    exact = queries @ stored.T
    exact[:, [0, 200]] = float("-inf")
    expected = exact.topk(10, dim=-1)
    scores, indices = index.search(queries, k=10, exclude=[0, 200])  # a batch: one float32 pass
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(scores, expected.values, atol=1e-6)
    for q in range(len(queries)):  # single queries: the 16-bit scan, then exact re-scoring
        scores, indices = index.search(queries[q], k=10, exclude=[0, 200])
        assert torch.equal(indices, expected.indices[q])
        assert torch.allclose(scores, expected.values[q], atol=1e-6)
