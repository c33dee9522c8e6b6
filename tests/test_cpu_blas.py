"""CPU float32 matmuls through numpy's BLAS while decoding (pipelines/cpu_blas_gill.py). Budget: about 1 s of tests (6 s with the imports) on 2 cores."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_info
from tiny_models import IMG_TOKEN_IDS, tiny_gill
from torch_threads import torch_threads

from gill_hf.pipelines import cpu_blas_gill
from gill_hf.pipelines.cpu_blas_gill import numpy_blas_linears, numpy_linear, numpy_linear_op
from gill_hf.pipelines.decoding_gill import GillDecodingOptions, GillTokenIds, gill_decode


@pytest.fixture(autouse=True)
def two_threads():
    """Two torch threads, so that "one inside the block, restored after" could fail on a 1-core runner too."""
    with torch_threads(2):
        yield


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def linears(*sizes: int) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(torch.nn.Linear(size, size) for size in sizes)


@pytest.mark.parametrize("shape", [(1, 40), (1, 1, 40), (3, 5, 40), (7, 40)])
def test_numpy_linear_matches_f_linear(shape):
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(24, 40, generator=generator), torch.randn(*shape, generator=generator)
    out = numpy_linear(x, weight)
    assert out.shape == (*shape[:-1], 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_the_op_has_a_fake_for_compile_and_the_same_values():
    weight, x = torch.randn(6, 8), torch.randn(2, 3, 8)
    torch.library.opcheck(numpy_linear_op, (x, weight), test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(numpy_linear_op(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_a_graph_traced_inside_the_block_holds_the_op_whole():
    # torch.export's strict mode traces with dynamo as torch.compile does, without compiling anything
    model, x = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16)), torch.randn(1, 16)
    with torch.no_grad(), numpy_blas_linears(model) as routed:
        program = torch.export.export(model, (x,), strict=True)
        expected = model(x)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert routed == 2 and targets.count("gill_hf.numpy_linear.default") == 2 and "aten.linear.default" not in targets
    torch.testing.assert_close(program.module()(x), expected)


def test_linears_are_routed_inside_the_block_and_restored_after(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False))
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
    blas_before = blas_threads()
    calls = []
    monkeypatch.setattr(cpu_blas_gill, "numpy_linear", lambda x, w: calls.append(tuple(w.shape)) or numpy_linear(x, w))
    with torch.no_grad(), numpy_blas_linears(model) as routed:
        assert routed == 2 and all("forward" in vars(m) for m in (model[0], model[2]))
        assert torch.get_num_threads() == 1 and set(blas_threads()) == {2}
        out = model(x)
        model[0].weight = torch.nn.Parameter(torch.zeros(32, 16))  # new weights inside the block are used
        assert torch.equal(model[0](x), model[0].bias.expand(4, 32))
    assert calls == [(32, 16), (8, 32), (32, 16)]  # every product went through numpy, the bias added after
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.get_num_threads() == 2 and blas_threads() == blas_before


def test_nested_and_concurrent_blocks_restore_the_threads_once_the_last_one_closes():
    blas_before = blas_threads()
    with torch.no_grad(), numpy_blas_linears(linears(8)) as outer:
        with numpy_blas_linears(linears(8)) as inner:  # another model: numpy keeps torch's count from before
            assert outer == inner == 1 and torch.get_num_threads() == 1 and set(blas_threads()) == {2}
        assert torch.get_num_threads() == 1 and set(blas_threads()) == {2}
    assert torch.get_num_threads() == 2 and blas_threads() == blas_before
    # two threads: a enters, b enters, a leaves, b leaves
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def block(entered, wait_for, done=None):
        with torch.no_grad(), numpy_blas_linears(linears(8)):
            entered.set()
            wait_for.wait(10)
        if done is not None:
            done.set()

    a = threading.Thread(target=block, args=(a_in, b_in, a_out))
    a.start()
    a_in.wait(10)
    b = threading.Thread(target=block, args=(b_in, a_out))
    b.start()
    a.join(10), b.join(10)
    seen = []
    reader = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # a thread started after
    reader.start(), reader.join(10)
    assert a_out.is_set() and seen == [2] and torch.get_num_threads() == 2 and blas_threads() == blas_before


def test_layers_of_another_dtype_stay_with_torch_and_a_hooked_one_is_skipped():
    model = torch.nn.ModuleList([torch.nn.Linear(8, 4), torch.nn.Linear(8, 4).to(torch.bfloat16)])
    # torch keeps its threads for the bf16 half it still computes, so no layer moves to numpy
    with torch.no_grad(), numpy_blas_linears(model) as routed:
        assert routed == 0 and torch.get_num_threads() == 2 and "forward" not in vars(model[0])
    # a small float16 part beside a float32 majority (GILL-tiny's vision tower beside its LM): the rest moves
    model = torch.nn.ModuleList([torch.nn.Linear(64, 64), torch.nn.Linear(8, 4).to(torch.float16)])
    with torch.no_grad(), numpy_blas_linears(model) as routed:
        assert routed == 1 and "forward" in vars(model[0]) and "forward" not in vars(model[1])
        x16 = torch.randn(2, 8, dtype=torch.float16)
        torch.testing.assert_close(model[1](x16), torch.nn.functional.linear(x16, model[1].weight, model[1].bias))
    wrapped = torch.nn.Linear(8, 4)
    wrapped.forward = own = lambda x: torch.zeros(1)  # a hook library's own forward is never replaced
    model = torch.nn.ModuleList([torch.nn.Linear(64, 64), wrapped, torch.nn.MultiheadAttention(8, 2)])  # most weights routable
    with torch.no_grad(), numpy_blas_linears(model) as routed:
        assert routed == 1 and "forward" in vars(model[0]) and wrapped.forward is own
        x = torch.randn(1, 3, 8)
        out, _ = model[2](x, x, x)  # its out_proj (a Linear subclass) stays with torch
    assert wrapped.forward is own and out.shape == (1, 3, 8)


def test_a_model_that_multiplies_mostly_elsewhere_keeps_torch_and_its_threads():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    assert any(isinstance(m, torch.nn.Linear) for m in gpt2.modules())  # its head, tied to the embedding
    with torch.no_grad(), numpy_blas_linears(gpt2) as routed:  # its blocks multiply in Conv1D
        assert routed == 0 and torch.get_num_threads() == 2


def test_autograd_keeps_torch():
    linear = torch.nn.Linear(8, 4)
    with numpy_blas_linears(linear) as routed:  # entered with autograd on: nothing changes
        assert routed == 0 and "forward" not in vars(linear) and torch.get_num_threads() == 2
    with torch.no_grad(), numpy_blas_linears(linear, enabled=False) as routed:
        assert routed == 0 and "forward" not in vars(linear)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.no_grad(), numpy_blas_linears(linear) as routed:
        assert routed == 1
        with torch.enable_grad():
            linear(x).sum().backward()  # recorded by autograd: F.linear, so the graph exists
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(3, 8))


def test_an_error_inside_the_block_still_restores_everything():
    linear, blas_before = torch.nn.Linear(8, 4), blas_threads()
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), numpy_blas_linears(linear) as routed:
        assert routed == 1
        raise RuntimeError("boom")
    assert "forward" not in vars(linear) and torch.get_num_threads() == 2 and blas_threads() == blas_before


@pytest.mark.parametrize("kind", ["opt", "llama"])  # GPT-2 multiplies in Conv1D: it keeps torch (test above)
def test_gill_decode_gives_the_same_tokens_and_hidden_states_with_either_blas(kind, monkeypatch):
    model = tiny_gill(kind, seed=3)
    ids = GillTokenIds(img_token_ids=IMG_TOKEN_IDS, image_token_id=model.config.image_token_id,
                       vocab_size=model.config.vocab_size, eos_token_id=None, pad_token_id=0, newline_token_id=None)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, 290, (3, 9), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding
    calls, results = [], {}
    monkeypatch.setattr(cpu_blas_gill, "numpy_linear", lambda x, w: calls.append(x.shape[:-1].numel()) or numpy_linear(x, w))
    for numpy_blas in (False, True):
        # the module path: the fused step (its own test file) makes its products without `numpy_linear`
        options = GillDecodingOptions(max_new_tokens=20, gen_scale_factor=3.0, numpy_blas=numpy_blas, fused_step=False)
        results[numpy_blas] = gill_decode(model, input_ids, mask, None, options, ids, [None] * 3)
        assert bool(calls) == numpy_blas
    assert 27 in calls and 3 in calls  # the prefill's rows and the cached steps' rows
    one_row = {blas: gill_decode(model, input_ids[:1], mask[:1], None, GillDecodingOptions(max_new_tokens=20, numpy_blas=blas, fused_step=False),
                                 ids, [None])[0].token_ids for blas in (False, True)}
    assert 1 in calls and one_row[True] == one_row[False]  # batch 1: matrix-vector products
    assert sum(len(row.block_starts) for row in results[True]) > 0  # [IMG] states are compared too
    for torch_row, blas_row in zip(results[False], results[True]):
        assert blas_row.token_ids == torch_row.token_ids and blas_row.block_starts == torch_row.block_starts
        torch.testing.assert_close(blas_row.img_hidden_states, torch_row.img_hidden_states, rtol=1e-5, atol=1e-5)


def test_the_pipeline_decodes_with_numpy_blas_unless_its_attribute_says_no(tmp_path, monkeypatch):
    from test_pipeline import FAST, tiny_pipeline

    pipe = tiny_pipeline(tmp_path)
    calls = []
    monkeypatch.setattr(cpu_blas_gill, "numpy_linear", lambda x, w: calls.append(1) or numpy_linear(x, w))
    settings = dict(prompt=["A dog runs across", "Two birds"], max_new_tokens=12, force_image=True, output_type="np", **FAST)
    assert pipe.numpy_blas is True
    with_blas = pipe(generator=torch.Generator().manual_seed(0), **settings)
    routed_calls = len(calls)
    pipe.numpy_blas = False
    with_torch = pipe(generator=torch.Generator().manual_seed(0), **settings)
    assert routed_calls > 0 and len(calls) == routed_calls  # the second call never reached numpy
    assert with_blas.token_ids == with_torch.token_ids
    for a, b in zip(with_blas.images, with_torch.images):
        assert abs(a[0].astype(float) - b[0].astype(float)).max() <= 1 / 255
