"""The streaming matrix-vector kernel of CPU decoding: values, where it applies, the build's files
(only its own, never half a library, a damaged one rebuilt), the fallback to numpy's BLAS, fork, and
a decoding through it. Budget: ~5 s (a few builds of a 20-line C file)."""

import multiprocessing
import sys

import numpy as np
import pytest
import torch

from gill_hf.pipelines import cpu_gemv_gill
from gill_hf.pipelines.cpu_blas_gill import blas_product
from gill_hf.pipelines.cpu_gemv_gill import MIN_WEIGHTS, build_kernel, streaming_gemv

COMPILER = cpu_gemv_gill._compiler()
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler: the kernel is not built, numpy's BLAS is used")
PLAIN, NATIVE = ["-O3", "-ffp-contract=off"], ["-O3", "-ffp-contract=off", "-march=native", "-fopenmp"]


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """`streaming_gemv` loaded anew with a cache in `tmp_path` (and again as it was afterwards)."""
    monkeypatch.setenv("GILL_HF_CACHE", str(tmp_path))
    streaming_gemv.cache_clear()
    yield tmp_path
    streaming_gemv.cache_clear()


def random_problem(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape[1], dtype=np.float32)


@needs_compiler
@pytest.mark.parametrize("shape", [(1536, 576), (577, 1000), (6144, 576), (113, 640)])
def test_values_match_float64_and_do_not_depend_on_threads(shape):
    matrix, vector = random_problem(shape)
    gemv = streaming_gemv()
    assert gemv is not None
    one, two = gemv(matrix, vector, 1), gemv(matrix, vector, 2)
    exact = matrix.astype(np.float64) @ vector.astype(np.float64)
    assert one.dtype == np.float32 and one.shape == (shape[0],)
    np.testing.assert_allclose(one, exact, rtol=0, atol=2e-5 * np.sqrt(shape[1]))
    assert np.array_equal(one, two)  # one thread per row, fixed order


@needs_compiler
@pytest.mark.skipif(sys.platform != "linux", reason="gcc's OpenMP is what this checks")
def test_the_library_is_built_with_openmp_and_rounds_as_a_plain_build(tmp_path):
    assert streaming_gemv().flags == NATIVE  # the threaded build, not a fallback
    plain, native = (cpu_gemv_gill._load(build_kernel(tmp_path, flags, COMPILER)) for flags in (PLAIN, NATIVE))
    matrix, vector = random_problem((777, 1000), seed=5)
    outputs = []
    for function in (plain, native):
        out = np.empty(777, dtype=np.float32)
        function(matrix.ctypes.data, vector.ctypes.data, out.ctypes.data, 777, 1000, 2)
        outputs.append(out)
    assert np.array_equal(*outputs)  # no fused multiply-adds: the same bits from every build


@needs_compiler
def test_arrays_not_for_the_kernel_are_declined():
    gemv = streaming_gemv()
    matrix, vector = random_problem((512, 512), seed=1)
    assert gemv(matrix, vector, 2) is not None
    assert gemv(matrix.astype(np.float64), vector, 2) is None
    assert gemv(matrix, vector.astype(np.float64), 2) is None
    assert gemv(matrix.astype(">f4"), vector, 2) is None  # another byte order
    assert gemv(matrix.T, vector, 2) is None  # not C-contiguous
    assert gemv(matrix[:, :256], vector[:256], 2) is None
    assert gemv(matrix, vector[:256], 2) is None  # width mismatch
    assert gemv(matrix, np.tile(vector, 2)[::2], 2) is None
    unaligned = np.frombuffer(np.zeros(512 * 512 * 4 + 1, np.uint8).data, dtype=np.float32, count=512 * 512, offset=1)
    assert gemv(unaligned.reshape(512, 512), vector, 2) is None
    assert gemv(matrix[: MIN_WEIGHTS // 512 - 1], vector, 2) is None  # numpy's dot is cheaper to call


@needs_compiler
def test_blas_product_takes_the_kernel_for_one_row_and_numpy_otherwise():
    matrix, _ = random_problem((1536, 576), seed=2)
    rows = np.random.default_rng(3).standard_normal((3, 576), dtype=np.float32)
    kernel_out = streaming_gemv()(matrix, rows[0], 2)
    assert not np.array_equal(kernel_out, matrix.dot(rows[0]))  # the two sum in different orders
    assert np.array_equal(blas_product(rows[:1], matrix), kernel_out[None])
    assert np.array_equal(blas_product(rows, matrix), rows.dot(matrix.T))
    small = matrix[:64]
    assert np.array_equal(blas_product(rows[:1], small), small.dot(rows[0])[None])


@needs_compiler
def test_build_writes_only_its_library_and_reuses_it(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    library = build_kernel(tmp_path, PLAIN, COMPILER)
    assert library is not None and library.parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", library.name])
    assert library.stat().st_mode & 0o777 == 0o755
    before = library.stat()
    assert build_kernel(tmp_path, PLAIN, COMPILER) == library
    after = library.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (tmp_path / "notes.txt").read_text() == "the user's"
    # flags the compiler rejects: no library, no partial file left behind
    assert build_kernel(tmp_path, [*PLAIN, "-fno-such-flag-gill"], COMPILER) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", library.name])


@needs_compiler
def test_first_use_builds_into_the_gill_cache(fresh_kernel):
    gemv = streaming_gemv()
    assert gemv is not None
    assert [p.suffix for p in (fresh_kernel / "kernels").iterdir()] == [".so"]


@needs_compiler
@pytest.mark.skipif(sys.platform != "linux", reason="the threaded build's flags are gcc's")
def test_a_damaged_library_in_the_cache_is_built_again(fresh_kernel):
    # damaged before this process loads it: overwriting a loaded library in place would crash any
    # process that has it mapped, which is why builds rename a new file over the old one instead
    library = build_kernel(fresh_kernel / "kernels", NATIVE, COMPILER)
    library.write_bytes(b"not a shared library")
    gemv = streaming_gemv()
    assert gemv is not None and gemv.flags == NATIVE  # not a fallback build
    assert [p.name for p in (fresh_kernel / "kernels").iterdir()] == [library.name]
    assert library.stat().st_size > 1000  # built again under the same name
    matrix, vector = random_problem((1536, 576))
    np.testing.assert_allclose(gemv(matrix, vector, 2), matrix @ vector, rtol=1e-4, atol=1e-4)


def test_turned_off_without_a_compiler_or_on_any_error_numpy_computes(fresh_kernel, monkeypatch):
    matrix, vector = random_problem((1536, 576), seed=3)
    row = vector[None]
    monkeypatch.setenv("GILL_HF_GEMV_KERNEL", "0")
    assert streaming_gemv() is None
    assert np.array_equal(blas_product(row, matrix), matrix.dot(row[0])[None])
    monkeypatch.delenv("GILL_HF_GEMV_KERNEL")
    streaming_gemv.cache_clear()
    monkeypatch.setenv("CC", "'unbalanced")
    monkeypatch.setenv("PATH", str(fresh_kernel))  # no compiler on it
    assert cpu_gemv_gill._compiler() is None and streaming_gemv() is None
    assert not (fresh_kernel / "kernels").exists()
    monkeypatch.undo()
    streaming_gemv.cache_clear()

    def broken_cache_root():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr("gill_hf.embedded.cache_root", broken_cache_root)
    assert streaming_gemv() is None  # reported, not raised: decoding goes on with numpy
    assert np.array_equal(blas_product(row, matrix), matrix.dot(row[0])[None])
    streaming_gemv.cache_clear()


def _child_product(queue):
    matrix, vector = random_problem((1536, 576), seed=4)
    queue.put(bool(np.allclose(blas_product(vector[None], matrix)[0], matrix @ vector, atol=1e-3)))


@needs_compiler
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
def test_a_forked_child_computes_after_the_parent_used_threads():
    matrix, vector = random_problem((1536, 576), seed=4)
    assert streaming_gemv()(matrix, vector, 2) is not None  # the parent's OpenMP pool is up
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_product, args=(queue,))
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0 and queue.get(timeout=5) is True


@needs_compiler
def test_decoding_through_the_kernel_gives_the_same_answers(monkeypatch):
    """A GILL on a Llama wide enough for the kernel (256 x 512 MLP): the fused step with the kernel,
    with numpy's BLAS, and torch's matmuls give the same tokens, blocks and [IMG] states."""
    from test_cpu_decode import gqa_gill, padded_prompts, token_ids
    from torch_threads import torch_threads

    from gill_hf.pipelines.decoding_gill import GillDecodingOptions, gill_decode

    model = gqa_gill(tie=True, hidden_size=256, intermediate_size=512, head_dim=64, initializer_range=0.1)
    input_ids, mask = padded_prompts()
    input_ids, mask = input_ids[:1], mask[:1]  # one row: matrix-vector products
    computed, gemv = [], streaming_gemv()

    def counted(*args):
        out = gemv(*args)
        computed.append(out is not None)
        return out

    monkeypatch.setattr("gill_hf.pipelines.cpu_blas_gill.streaming_gemv", lambda: counted)
    results, counts = {}, {}
    with torch_threads(2):
        for name, settings in {"kernel": {}, "torch": dict(numpy_blas=False)}.items():
            computed.clear()
            options = GillDecodingOptions(max_new_tokens=16, gen_scale_factor=3.0, **settings)
            results[name] = gill_decode(model, input_ids, mask, None, options, token_ids(model), [None])[0]
            counts[name] = sum(computed)
        monkeypatch.setattr("gill_hf.pipelines.cpu_blas_gill.streaming_gemv", lambda: None)  # numpy's BLAS
        options = GillDecodingOptions(max_new_tokens=16, gen_scale_factor=3.0)
        results["numpy"] = gill_decode(model, input_ids, mask, None, options, token_ids(model), [None])[0]
    # per layer and step: stacked q/k/v, o, gate, up, down (512 x 256 each and more), 2 layers... 15 steps
    assert counts["kernel"] >= 15 * 3 * 5 and counts["torch"] == 0
    assert len(set(results["kernel"].token_ids)) > 8 and results["kernel"].block_starts  # varied text and an [IMG] block
    for name in ("torch", "numpy"):
        assert results[name].token_ids == results["kernel"].token_ids
        assert results[name].block_starts == results["kernel"].block_starts
        torch.testing.assert_close(results[name].img_hidden_states, results["kernel"].img_hidden_states, rtol=1e-5, atol=1e-5)
