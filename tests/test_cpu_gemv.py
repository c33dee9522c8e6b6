"""The streaming matrix-vector kernel of CPU decoding: values, where it applies, the build's files
(only its own, never half a library), and the fallback to numpy's BLAS. Budget: ~3 s (one build
of a 20-line C file where the cache is cold)."""

import os
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from gill_hf.pipelines import cpu_gemv_gill
from gill_hf.pipelines.cpu_blas_gill import blas_product
from gill_hf.pipelines.cpu_gemv_gill import MIN_WEIGHTS, build_kernel, streaming_gemv

HAS_COMPILER = shutil.which((os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]) is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the kernel is not built, numpy's BLAS is used")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """`streaming_gemv` loaded anew with a cache in `tmp_path` (and again as it was afterwards)."""
    monkeypatch.setenv("GILL_HF_CACHE", str(tmp_path))
    streaming_gemv.cache_clear()
    yield tmp_path
    streaming_gemv.cache_clear()


@needs_compiler
@pytest.mark.parametrize("shape", [(1536, 576), (577, 1000), (6144, 576), (113, 640)])
def test_values_match_float64_and_do_not_depend_on_threads(shape):
    rng = np.random.default_rng(0)
    matrix, vector = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape[1], dtype=np.float32)
    gemv = streaming_gemv()
    assert gemv is not None
    one, two = gemv(matrix, vector, 1), gemv(matrix, vector, 2)
    exact = matrix.astype(np.float64) @ vector.astype(np.float64)
    assert one.dtype == np.float32 and one.shape == (shape[0],)
    np.testing.assert_allclose(one, exact, rtol=0, atol=2e-5 * np.sqrt(shape[1]))
    assert np.array_equal(one, two)  # one thread per row, fixed order


@needs_compiler
def test_arrays_not_for_the_kernel_are_declined():
    gemv = streaming_gemv()
    rng = np.random.default_rng(1)
    matrix, vector = rng.standard_normal((512, 512), dtype=np.float32), rng.standard_normal(512, dtype=np.float32)
    assert gemv(matrix, vector, 2) is not None
    assert gemv(matrix.astype(np.float64), vector, 2) is None
    assert gemv(matrix, vector.astype(np.float64), 2) is None
    assert gemv(matrix.T, vector, 2) is None  # not C-contiguous
    assert gemv(matrix[:, :256], vector[:256], 2) is None
    assert gemv(matrix, vector[:256], 2) is None  # width mismatch
    assert gemv(matrix, np.tile(vector, 2)[::2], 2) is None
    small = matrix[: MIN_WEIGHTS // 512 - 1]
    assert gemv(small, vector, 2) is None  # numpy's dot is cheaper to call


@needs_compiler
def test_blas_product_takes_the_kernel_for_one_row_and_numpy_otherwise():
    rng = np.random.default_rng(2)
    matrix, rows = rng.standard_normal((1536, 576), dtype=np.float32), rng.standard_normal((3, 576), dtype=np.float32)
    kernel_out = streaming_gemv()(matrix, rows[0], 2)
    assert not np.array_equal(kernel_out, matrix.dot(rows[0]))  # the two sum in different orders
    assert np.array_equal(blas_product(rows[:1], matrix), kernel_out[None])
    assert np.array_equal(blas_product(rows, matrix), rows.dot(matrix.T))
    small = matrix[:64]
    assert np.array_equal(blas_product(rows[:1], small), small.dot(rows[0])[None])


@needs_compiler
def test_build_writes_only_its_library_and_reuses_it(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    library = build_kernel(tmp_path, ["-O3"])
    assert library is not None and library.parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", library.name])
    before = library.stat()
    assert build_kernel(tmp_path, ["-O3"]) == library
    after = library.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (tmp_path / "notes.txt").read_text() == "the user's"
    # flags the compiler rejects: no library, no partial file left behind
    assert build_kernel(tmp_path, ["-O3", "-fno-such-flag-gill"]) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", library.name])


@needs_compiler
def test_first_use_builds_into_the_gill_cache(fresh_kernel):
    gemv = streaming_gemv()
    assert gemv is not None
    assert [p.suffix for p in (fresh_kernel / "kernels").iterdir()] == [".so"]


def test_turned_off_or_without_a_compiler_numpy_computes(fresh_kernel, monkeypatch):
    rng = np.random.default_rng(3)
    matrix, row = rng.standard_normal((1536, 576), dtype=np.float32), rng.standard_normal((1, 576), dtype=np.float32)
    monkeypatch.setenv("GILL_HF_GEMV_KERNEL", "0")
    assert streaming_gemv() is None
    assert np.array_equal(blas_product(row, matrix), matrix.dot(row[0])[None])
    streaming_gemv.cache_clear()
    monkeypatch.delenv("GILL_HF_GEMV_KERNEL")
    monkeypatch.setenv("CC", str(fresh_kernel / "no-such-compiler"))
    assert streaming_gemv() is None
    assert not (fresh_kernel / "kernels").exists() or not any((fresh_kernel / "kernels").iterdir())


@needs_compiler
def test_decoding_through_the_kernel_gives_the_same_answers(monkeypatch):
    """A GILL on a Llama wide enough for the kernel (256 x 512 MLP): the fused step with the kernel,
    without it, and torch's matmuls give the same tokens and [IMG] states."""
    from test_cpu_decode import gqa_gill, padded_prompts, token_ids
    from torch_threads import torch_threads

    from gill_hf.pipelines.decoding_gill import GillDecodingOptions, gill_decode

    model = gqa_gill(tie=True, hidden_size=256, intermediate_size=512, head_dim=64, initializer_range=0.1)
    input_ids, mask = padded_prompts()
    input_ids = input_ids[:1]  # one row: matrix-vector products
    calls, gemv = [], streaming_gemv()
    monkeypatch.setattr(cpu_gemv_gill, "streaming_gemv", lambda: lambda *args: calls.append(1) or gemv(*args))
    monkeypatch.setattr("gill_hf.pipelines.cpu_blas_gill.streaming_gemv", cpu_gemv_gill.streaming_gemv)
    results, counts = {}, {}
    with torch_threads(2):
        for name, settings in {"kernel": {}, "torch": dict(numpy_blas=False)}.items():
            calls.clear()
            options = GillDecodingOptions(max_new_tokens=16, gen_scale_factor=3.0, **settings)
            results[name] = gill_decode(model, input_ids, mask[:1], None, options, token_ids(model), [None])[0]
            counts[name] = len(calls)
        monkeypatch.setattr("gill_hf.pipelines.cpu_blas_gill.streaming_gemv", lambda: None)  # numpy's BLAS
        results["numpy"] = gill_decode(model, input_ids, mask[:1], None, GillDecodingOptions(max_new_tokens=16, gen_scale_factor=3.0),
                                       token_ids(model), [None])[0]
    assert counts["kernel"] >= 15 * 3 * 4 and counts["torch"] == 0  # q/k/v, o, gate, up (down too: 512 x 256) per layer and step
    assert len(set(results["kernel"].token_ids)) > 8 and results["kernel"].block_starts  # varied text and an [IMG] block
    for name in ("torch", "numpy"):
        assert results[name].token_ids == results["kernel"].token_ids
        assert results[name].block_starts == results["kernel"].block_starts
        torch.testing.assert_close(results[name].img_hidden_states, results["kernel"].img_hidden_states, rtol=1e-5, atol=1e-5)
