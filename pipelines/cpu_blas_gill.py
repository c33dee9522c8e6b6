"""CPU fp32 inference matmuls through numpy's BLAS.

At batch 1 a decoding step is a chain of matrix-vector products, bound by how fast the weights
stream from memory. torch's x86 wheels run them through MKL, which on some CPUs (the AMD EPYC this
project is measured on) reads well under half the machine's bandwidth; numpy's bundled OpenBLAS
streams at close to it and is also faster at the prefill's small matrix products (README,
"Benchmarks"). `numpy_blas_linears(model)` routes the `nn.Linear` layers of a CPU float32 `model`
through `numpy.dot` for the duration of a `with` block; inputs of another dtype or device, and calls
that autograd records, take `F.linear` as before. `GillPipeline` decodes inside it (its `numpy_blas`
attribute).

The two libraries sum in different orders, so logits differ in the last bits (about 1e-6 relative);
greedy tokens are the same in the benchmark and the tests. Thread pools: numpy's BLAS gets torch's
thread count and torch runs on one thread inside the block, because two busy pools on the same
cores stall each other (measured 6x slower) and the operators left to torch at batch 1 are too
small to gain from threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

try:  # a dependency of gill-hf; a remote-code folder loaded without it keeps torch's matmuls
    from threadpoolctl import threadpool_limits
except ImportError:
    threadpool_limits = None


def numpy_linear(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(input, weight)` computed by numpy's BLAS (CPU float32 tensors outside autograd)."""
    rows = input.numpy()  # numpy-side reshapes: a microsecond a call less than torch's, 211 calls a token
    rows = rows.reshape(-1, rows.shape[-1])
    matrix = weight.numpy()
    # One row is a matrix-vector product (BLAS gemv), which streams the weights once.
    out = matrix.dot(rows[0])[None] if rows.shape[0] == 1 else rows.dot(matrix.T)
    return torch.from_numpy(out.reshape(*input.shape[:-1], matrix.shape[0]))


@torch.library.custom_op("gill_hf::numpy_linear", mutates_args=())
def numpy_linear_op(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`numpy_linear` as an op, so that `torch.compile` keeps each product as one opaque call instead
    of breaking the graph (eager code calls the function itself: the op's dispatch costs a few
    microseconds a call)."""
    return numpy_linear(input, weight)


@numpy_linear_op.register_fake
def _(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return input.new_empty(*input.shape[:-1], weight.shape[0])


def _cpu_float32(module: torch.nn.Linear) -> bool:
    return module.weight.device.type == "cpu" and module.weight.dtype == torch.float32


def _routable(module: torch.nn.Linear) -> bool:
    # Subclasses may compute differently (or never call forward: MultiheadAttention's out_proj), and a
    # forward set on the instance (accelerate's hooks) is someone else's.
    return type(module) is torch.nn.Linear and "forward" not in vars(module) and module.weight.is_contiguous()


def _blas_forward(module: torch.nn.Linear):
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()

    def forward(input: torch.Tensor) -> torch.Tensor:
        if input.dtype != torch.float32 or input.device.type != "cpu" or (torch.is_grad_enabled() and (
                input.requires_grad or module.weight.requires_grad)):
            return F.linear(input, module.weight, module.bias)
        out = numpy_linear_op(input, weight) if torch.compiler.is_compiling() else numpy_linear(input.detach(), weight)
        return out if bias is None else out + bias

    return forward


@contextlib.contextmanager
def numpy_blas_linears(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, `model`'s `nn.Linear` layers compute with numpy's BLAS, which gets torch's thread
    count while torch runs on one thread; both are restored on exit. When a linear layer of `model` has
    another dtype or device (a bf16 language model beside float32 heads, a GPU, offloading), torch keeps
    it and its threads, and nothing changes; so too when the routable layers hold less than half of
    `model`'s weights. Layers that are not plain `nn.Linear` or carry their own `forward` stay with
    torch. Yields how many layers were routed (0: nothing changed; also when
    `enabled` is False or threadpoolctl is missing)."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    enabled = enabled and threadpool_limits is not None and all(map(_cpu_float32, linears))
    modules = [module for module in linears if _routable(module)] if enabled else []
    # Worth it only where the routed layers hold most of the weights: GPT-2's blocks multiply in
    # `Conv1D`, which would be left to a single torch thread.
    routed = sum(module.weight.numel() for module in {id(m.weight): m for m in modules}.values())
    if routed * 2 < sum(param.numel() for param in model.parameters()):
        modules = []
    if not modules:
        yield 0
        return
    threads = torch.get_num_threads()
    try:
        for module in modules:
            module.forward = _blas_forward(module)
        with threadpool_limits(limits=threads, user_api="blas"):
            torch.set_num_threads(1)
            try:
                yield len(modules)
            finally:
                torch.set_num_threads(threads)
    finally:
        for module in modules:
            vars(module).pop("forward", None)


__all__ = ["numpy_linear", "numpy_linear_op", "numpy_blas_linears"]
