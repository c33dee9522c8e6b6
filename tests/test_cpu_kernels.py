"""The compiled CPU kernels of decoding (the streaming product of a matrix with a few rows and the Llama step):
values, where they apply, the build's files (only its own, never half a library, a damaged one
rebuilt), the fallback to numpy, fork, and a decoding through them. Budget: ~5 s (a few builds of a
150-line C file). The compiled step's values against the model's modules: tests/test_cpu_decode.py."""

import multiprocessing
import sys

import numpy as np
import pytest
import torch
from torch_threads import torch_threads

from gill_hf.pipelines import cpu_kernels_gill
from gill_hf.pipelines.cpu_blas_gill import blas_product
from gill_hf.pipelines.cpu_kernels_gill import MAX_ROWS, MIN_WEIGHTS, build_kernel, cpu_kernels

COMPILER = cpu_kernels_gill._compiler()
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler: the kernels are not built, numpy computes")
PLAIN, NATIVE = ["-O3", "-ffp-contract=off"], ["-O3", "-ffp-contract=off", "-march=native", "-fopenmp"]


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """`cpu_kernels` loaded anew with a cache in `tmp_path` (and again as it was afterwards)."""
    monkeypatch.setenv("GILL_HF_CACHE", str(tmp_path))
    cpu_kernels.cache_clear()
    yield tmp_path
    cpu_kernels.cache_clear()


def random_problem(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape[1], dtype=np.float32)


@needs_compiler
@pytest.mark.parametrize("shape", [(1536, 576), (577, 1000), (6144, 576), (113, 640)])
def test_values_match_float64_and_do_not_depend_on_threads(shape):
    matrix, vector = random_problem(shape)
    product = cpu_kernels().product
    one, two = product(matrix, vector[None], 1), product(matrix, vector[None], 2)
    exact = matrix.astype(np.float64) @ vector.astype(np.float64)
    assert one.dtype == np.float32 and one.shape == (1, shape[0])
    np.testing.assert_allclose(one[0], exact, rtol=0, atol=2e-5 * np.sqrt(shape[1]))
    assert np.array_equal(one, two)  # one thread per row, fixed order


@needs_compiler
@pytest.mark.parametrize("batch", range(2, MAX_ROWS + 1))
def test_each_row_of_a_batch_has_the_bits_of_that_row_alone(batch):
    """Rows go through the weights four, two or one at a time (7 = 4 + 2 + 1), each summed in one row's order."""
    matrix, _ = random_problem((577, 1000), seed=batch)
    rows = np.random.default_rng(batch).standard_normal((batch, 1000), dtype=np.float32)
    together = cpu_kernels().product(matrix, rows, 2)
    assert together.shape == (batch, 577)
    for b in range(batch):
        assert np.array_equal(together[b], cpu_kernels().product(matrix, rows[b : b + 1], 1)[0])
    np.testing.assert_allclose(together, rows.astype(np.float64) @ matrix.astype(np.float64).T, rtol=0, atol=2e-5 * np.sqrt(1000))


@needs_compiler
@pytest.mark.skipif(sys.platform != "linux", reason="gcc's OpenMP is what this checks")
def test_the_library_is_built_with_openmp_and_rounds_as_a_plain_build(tmp_path):
    assert cpu_kernels().flags == NATIVE  # the threaded build, not a fallback
    plain, native = (cpu_kernels_gill._load(build_kernel(tmp_path, flags, COMPILER)).gill_product for flags in (PLAIN, NATIVE))
    matrix, _ = random_problem((777, 1000), seed=5)
    rows = np.random.default_rng(5).standard_normal((7, 1000), dtype=np.float32)
    outputs = []
    for function in (plain, native):
        out = np.empty((7, 777), dtype=np.float32)
        function(matrix.ctypes.data, rows.ctypes.data, out.ctypes.data, 777, 1000, 7, 2)
        outputs.append(out)
    assert np.array_equal(*outputs)  # no fused multiply-adds: the same bits from every build


@needs_compiler
def test_arrays_not_for_the_kernel_are_declined():
    product = cpu_kernels().product
    matrix, vector = random_problem((512, 512), seed=1)
    row = vector[None]
    assert product(matrix, row, 2) is not None and product(matrix, np.tile(row, (MAX_ROWS, 1)), 2) is not None
    assert product(matrix, np.tile(row, (MAX_ROWS + 1, 1)), 2) is None  # a gemm's work: numpy's BLAS
    assert product(matrix, row[:0], 2) is None
    assert product(matrix, vector, 2) is None  # rows are 2-D
    assert product(matrix.astype(np.float64), row, 2) is None
    assert product(matrix, row.astype(np.float64), 2) is None
    assert product(matrix.astype(">f4"), row, 2) is None  # another byte order
    assert product(matrix.T, row, 2) is None  # not C-contiguous
    assert product(matrix[:, :256], row[:, :256], 2) is None
    assert product(matrix, row[:, :256], 2) is None  # width mismatch
    assert product(matrix, np.tile(row, 2)[:, ::2], 2) is None
    assert product(matrix, np.tile(row, (2, 2))[:, :512], 2) is None  # rows with a gap between them
    unaligned = np.frombuffer(np.zeros(512 * 512 * 4 + 1, np.uint8).data, dtype=np.float32, count=512 * 512, offset=1)
    assert product(unaligned.reshape(512, 512), row, 2) is None
    assert product(matrix[: MIN_WEIGHTS // 512 - 1], row, 2) is None  # numpy's dot is cheaper to call


@needs_compiler
def test_blas_product_takes_the_kernel_up_to_max_rows_and_numpy_otherwise():
    matrix, _ = random_problem((1536, 576), seed=2)
    rows = np.random.default_rng(3).standard_normal((MAX_ROWS + 1, 576), dtype=np.float32)
    kernel_out = cpu_kernels().product(matrix, rows[:MAX_ROWS], 2)
    assert not np.array_equal(kernel_out[0], matrix.dot(rows[0]))  # the two sum in different orders
    assert np.array_equal(blas_product(rows[:1], matrix), kernel_out[:1])
    assert np.array_equal(blas_product(rows[:MAX_ROWS], matrix), kernel_out)
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
    assert cpu_kernels() is not None
    assert [p.suffix for p in (fresh_kernel / "kernels").iterdir()] == [".so"]


@needs_compiler
@pytest.mark.skipif(sys.platform != "linux", reason="the threaded build's flags are gcc's")
def test_a_damaged_library_in_the_cache_is_built_again(fresh_kernel):
    # damaged before this process loads it: overwriting a loaded library in place would crash any
    # process that has it mapped, which is why builds rename a new file over the old one instead
    library = build_kernel(fresh_kernel / "kernels", NATIVE, COMPILER)
    library.write_bytes(b"not a shared library")
    kernels = cpu_kernels()
    assert kernels is not None and kernels.flags == NATIVE  # not a fallback build
    assert [p.name for p in (fresh_kernel / "kernels").iterdir()] == [library.name]
    assert library.stat().st_size > 1000  # built again under the same name
    matrix, vector = random_problem((1536, 576))
    np.testing.assert_allclose(kernels.product(matrix, vector[None], 2)[0], matrix @ vector, rtol=1e-4, atol=1e-4)


def test_turned_off_without_a_compiler_or_on_any_error_numpy_computes(fresh_kernel, monkeypatch):
    matrix, vector = random_problem((1536, 576), seed=3)
    row = vector[None]
    monkeypatch.setenv("GILL_HF_CPU_KERNELS", "0")
    assert cpu_kernels() is None
    assert np.array_equal(blas_product(row, matrix), matrix.dot(row[0])[None])
    monkeypatch.delenv("GILL_HF_CPU_KERNELS")
    cpu_kernels.cache_clear()
    monkeypatch.setenv("CC", "'unbalanced")
    monkeypatch.setenv("PATH", str(fresh_kernel))  # no compiler on it
    assert cpu_kernels_gill._compiler() is None and cpu_kernels() is None
    assert not (fresh_kernel / "kernels").exists()
    monkeypatch.undo()
    cpu_kernels.cache_clear()

    def broken_cache_root():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr("gill_hf.embedded.cache_root", broken_cache_root)
    assert cpu_kernels() is None  # reported, not raised: decoding goes on with numpy
    assert np.array_equal(blas_product(row, matrix), matrix.dot(row[0])[None])
    cpu_kernels.cache_clear()


def _child_product(queue):
    matrix, vector = random_problem((1536, 576), seed=4)
    queue.put(bool(np.allclose(blas_product(vector[None], matrix)[0], matrix @ vector, atol=1e-3)))


@needs_compiler
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
def test_a_forked_child_computes_after_the_parent_used_threads():
    matrix, vector = random_problem((1536, 576), seed=4)
    assert cpu_kernels().product(matrix, vector[None], 2) is not None  # the parent's OpenMP pool is up
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_product, args=(queue,))
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0 and queue.get(timeout=5) is True


class _Counted:
    """`cpu_kernels()` with its calls counted by kind (None: that call declined its arrays)."""

    def __init__(self, kernels):
        self.kernels, self.calls = kernels, []

    def product(self, *args):
        out = self.kernels.product(*args)
        self.calls.append("product" if out is not None else None)
        return out

    def llama_step(self, *args):
        self.calls.append("step")
        return self.kernels.llama_step(*args)


@needs_compiler
def test_decoding_through_the_kernels_gives_the_same_answers(monkeypatch):
    """A GILL on a Llama wide enough for the streaming kernel (256 x 512 MLP): the compiled step, the numpy step with
    the streaming kernel, with numpy's BLAS, and torch's matmuls give the same tokens, blocks and [IMG] states."""
    from test_cpu_decode import gqa_gill, padded_prompts, token_ids

    from gill_hf.pipelines.decoding_gill import GillDecodingOptions, gill_decode

    model = gqa_gill(tie=True, hidden_size=256, intermediate_size=512, head_dim=64, initializer_range=0.1)
    input_ids, mask = padded_prompts()
    input_ids, mask = input_ids[:1], mask[:1]  # one row: matrix-vector products
    counted = _Counted(cpu_kernels())
    paths = {"compiled step": (counted, counted, {}), "numpy step": (None, counted, {}),
             "numpy BLAS": (None, None, {}), "torch": (counted, counted, dict(numpy_blas=False))}
    results, calls = {}, {}
    with torch_threads(2):
        for name, (step_kernels, product_kernels, settings) in paths.items():
            monkeypatch.setattr("gill_hf.pipelines.cpu_decode_gill.cpu_kernels", lambda: step_kernels)
            monkeypatch.setattr("gill_hf.pipelines.cpu_blas_gill.cpu_kernels", lambda: product_kernels)
            counted.calls.clear()
            options = GillDecodingOptions(max_new_tokens=16, gen_scale_factor=3.0, **settings)
            results[name] = gill_decode(model, input_ids, mask, None, options, token_ids(model), [None])[0]
            calls[name] = {kind: counted.calls.count(kind) for kind in ("step", "product")}
    # 15 steps; the numpy step: per layer and step the stacked q/k/v, o, gate, up and down, then the
    # head (320 x 256); the prompt's pass is a gemm but for its head, one row (only the last position's
    # logits are computed: logits_to_keep=1)
    assert calls["compiled step"] == {"step": 15, "product": 1} and calls["torch"] == {"step": 0, "product": 0}
    assert calls["numpy step"] == {"step": 0, "product": 15 * (model.config.text_config.num_hidden_layers * 5 + 1) + 1}
    assert len(set(results["torch"].token_ids)) > 8 and results["torch"].block_starts  # varied text and an [IMG] block
    for name in ("compiled step", "numpy step", "numpy BLAS"):
        assert results[name].token_ids == results["torch"].token_ids
        assert results[name].block_starts == results["torch"].block_starts
        torch.testing.assert_close(results[name].img_hidden_states, results["torch"].img_hidden_states, rtol=1e-5, atol=1e-5)


@needs_compiler
@torch.no_grad()
def test_the_compiled_step_gives_the_same_bits_on_any_thread_count_and_refuses_wrong_arrays():
    """Each output of the step is computed by one thread in a fixed order (rows of a product, a query
    head's attention; norms on one thread), so 1 and 3 threads agree to the bit."""
    from test_cpu_decode import fused_steps, gqa_gill, padded_prompts

    from transformers import DynamicCache

    from gill_hf.modeling.lora_gill import apply_lora
    from gill_hf.pipelines.cpu_decode_gill import NumpyLlamaDecoder

    model = gqa_gill(tie=True, hidden_size=128, intermediate_size=320, head_dim=32)
    apply_lora(model, r=4, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"])
    for name, param in model.language_model.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.5)
    lm, (input_ids, mask) = model.language_model, padded_prompts()
    tokens = list(torch.randint(4, 290, (5, 1), generator=torch.Generator().manual_seed(4)))
    runs = []
    for threads in (1, 3):
        with torch_threads(threads):
            runs.append(fused_steps(lm, input_ids[:1], mask[:1], tokens, 2, compiled=True))
    for (logits_1, hidden_1), (logits_3, hidden_3) in zip(*runs, strict=True):
        assert torch.equal(logits_1, logits_3) and torch.equal(hidden_1, hidden_3)

    decoder, kernels, cache = NumpyLlamaDecoder(lm), cpu_kernels(), DynamicCache(config=lm.config)
    lm(input_ids=input_ids[:1], cache=cache, use_cache=True)  # 9 positions
    decoder.start(cache, mask[:1], torch.tensor([9]), 4)
    x, cos, sin = np.zeros(128, np.float32), decoder.cos[0, 0, 0], decoder.sin[0, 0, 0]
    for bad in (dict(x=np.zeros(64, np.float32)), dict(x=np.zeros(128)), dict(cos=cos[:16]), dict(slot=13),
                dict(x=np.zeros(256, np.float32)[::2])):
        arguments = dict(x=x, cos=cos, sin=sin, slot=9) | bad
        with pytest.raises(ValueError, match="llama_step: arrays of the wrong shape or layout for this model"):
            kernels.llama_step(decoder.compiled, arguments["x"], arguments["cos"], arguments["sin"], arguments["slot"], 2)
    with pytest.raises(ValueError, match="the KV cache must be two writeable float32 arrays of shape"):
        decoder.compiled.start(decoder.keys[:, 0, :1], decoder.values[:, 0])  # another kv-head count
    logits, _, _ = kernels.llama_step(decoder.compiled, x, cos, sin, 9, 2)
    assert logits.shape == (lm.config.vocab_size,) and np.isfinite(logits).all()

