"""CPU fp32 inference matmuls through numpy's BLAS.

At batch 1 a decoding step is a chain of matrix-vector products, bound by how fast the weights
stream from memory. torch's x86 wheels run them through MKL, which on some CPUs (the AMD EPYC this
project is measured on) reads well under half the machine's bandwidth; numpy's bundled OpenBLAS
streams faster and is also faster at the prefill's small matrix products (README, "Benchmarks");
a product of up to 8 rows (a decoding step's batch) goes to the streaming kernel of `cpu_kernels_gill`
where it was built, which reads about twice as fast per core as OpenBLAS's gemv there and beats its
gemm at so few rows. `numpy_blas_linears(model)` routes the
`nn.Linear` layers of a CPU float32 `model` through `blas_product` for the duration of a `with`
block; inputs of another dtype or device, and calls that autograd records, take `F.linear` as
before. `GillPipeline` decodes inside it (its `numpy_blas` attribute).

The libraries sum in different orders, so logits differ in the last bits (about 1e-6 relative);
greedy tokens are the same in the benchmark and the tests. Thread pools: numpy's BLAS (and the
kernel) get torch's thread count and torch runs on one thread inside the block, because two busy
pools on the same cores stall each other (measured 6x slower) and the operators left to torch at
batch 1 are too small to gain from threads.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .cpu_kernels_gill import MAX_ROWS, cpu_kernels

try:  # a dependency of gill-hf; a remote-code folder loaded without it keeps torch's matmuls
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:
    threadpool_info = threadpool_limits = None


def blas_product(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """`rows @ matrix.T` for 2-D arrays. Up to `MAX_ROWS` rows (a decoding step's batch) stream the
    weights once, by the kernel of `cpu_kernels_gill` where it was built (~2x OpenBLAS's gemv per core
    at one row, 1.4-3x OpenBLAS's gemm at 2-8 rows, where measured; each row's output has the bits of
    that row alone), else numpy's BLAS; more rows (a prompt's pass) are a BLAS gemm."""
    kernels = cpu_kernels() if rows.shape[0] <= MAX_ROWS else None
    out = None if kernels is None else kernels.product(matrix, rows, product_threads())
    if out is not None:
        return out
    return matrix.dot(rows[0])[None] if rows.shape[0] == 1 else rows.dot(matrix.T)


def product_threads() -> int:
    """Threads for a product: what numpy's BLAS gets inside a `numpy_blas_linears` block (torch is on
    one thread there), else torch's thread count."""
    return _THREADS.product_threads()


def numpy_linear(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(input, weight)` computed by numpy's BLAS (CPU float32 tensors outside autograd)."""
    rows = input.numpy()  # numpy-side reshapes: a microsecond a call less than torch's, 211 calls a token
    out = blas_product(rows.reshape(-1, rows.shape[-1]), weight.numpy())
    return torch.from_numpy(out.reshape(*input.shape[:-1], weight.shape[0]))


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
    # forward set on the instance (accelerate's hooks, another block on the same model) is someone else's.
    return type(module) is torch.nn.Linear and "forward" not in vars(module) and module.weight.is_contiguous()


@functools.cache
def _numpy_uses_openblas() -> bool:
    """numpy's BLAS is the pthreads OpenBLAS its wheels bundle: the library measured. An MKL-linked
    numpy gains nothing over torch's MKL, and an OpenMP OpenBLAS would share torch's thread pool."""
    return any(pool["internal_api"] == "openblas" and pool.get("threading_layer") == "pthreads" for pool in threadpool_info())


def _blas_forward(module: torch.nn.Linear):
    def forward(input: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias  # read at each call: a layer may be given new weights
        if input.dtype != torch.float32 or input.device.type != "cpu" or (
                torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)):
            return F.linear(input, weight, bias)
        if torch.compiler.is_compiling():  # traced: the op, whose fake stands in for it
            out = numpy_linear_op(input, weight.detach())
        elif type(input) is not torch.Tensor or input.is_neg():  # subclasses and negative views: no .numpy()
            return F.linear(input, weight, bias)
        else:
            out = numpy_linear(input.detach(), weight.detach())
        return out if bias is None else out + bias.detach()

    return forward


class _ThreadSettings:
    """torch's and numpy's thread counts while any block is open, in any thread: the first block in
    saves them, the last one out restores them (a thread's own `torch.get_num_threads()` would read
    another block's 1)."""

    def __init__(self):
        self.lock, self.open_blocks, self.saved, self.limiter = threading.Lock(), 0, 1, None

    def enter(self) -> None:
        with self.lock:
            if self.open_blocks == 0:
                self.saved = torch.get_num_threads()
                self.limiter = threadpool_limits(limits=self.saved, user_api="blas")
                torch.set_num_threads(1)
            self.open_blocks += 1

    def product_threads(self) -> int:
        """Threads for a product: what numpy's BLAS gets inside a block (torch is on one there)."""
        return self.saved if self.open_blocks else torch.get_num_threads()

    def exit(self) -> None:
        with self.lock:
            self.open_blocks -= 1
            if self.open_blocks == 0:
                torch.set_num_threads(self.saved)
                self.limiter.restore_original_limits()


_THREADS = _ThreadSettings()


@contextlib.contextmanager
def numpy_blas_linears(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, `model`'s `nn.Linear` layers compute with numpy's BLAS, which gets torch's thread
    count while torch runs on one thread; both are restored when the last open block closes. For
    inference: entered with autograd on, nothing changes. Only plain `nn.Linear` layers with float32
    CPU weights and no `forward` of their own are routed, and only where they hold at least half of
    `model`'s weights: a bf16 language model beside float32 heads, a GPU, offloading hooks or GPT-2's
    `Conv1D` leave everything to torch and its threads, while a small float16 vision tower beside a
    float32 language model stays with torch (on one thread) as the rest moves. Nothing changes either
    when numpy's BLAS is not the OpenBLAS of its wheels. Inputs that are tensor subclasses stay with
    torch. Yields how many layers were routed (0: nothing changed; also when `enabled` is False or
    threadpoolctl is missing)."""
    enabled = enabled and threadpool_limits is not None and not torch.is_grad_enabled()
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)] if enabled else []
    modules = [module for module in linears if _routable(module) and _cpu_float32(module)]
    # Worth it only where the routed layers hold most of the weights: what stays with torch runs on a
    # single thread inside the block (a bf16 LM beside float32 heads was 25% slower routed; GPT-2's
    # blocks multiply in `Conv1D`).
    routed = sum(module.weight.numel() for module in {id(m.weight): m for m in modules}.values())
    if not modules or routed * 2 < sum(param.numel() for param in model.parameters()) or not _numpy_uses_openblas():
        yield 0
        return
    _THREADS.enter()
    try:
        for module in modules:
            module.forward = _blas_forward(module)
        yield len(modules)
    finally:
        for module in modules:
            vars(module).pop("forward", None)
        _THREADS.exit()


__all__ = ["blas_product", "numpy_linear", "numpy_linear_op", "numpy_blas_linears", "product_threads"]
