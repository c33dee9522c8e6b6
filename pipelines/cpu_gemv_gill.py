"""A streaming matrix-vector product for CPU decoding, built on first use with the system's C compiler.

At batch 1 every product of a decoding step is a matrix-vector product whose cost is reading the
weights once. On the 2-core AMD EPYC (Zen 4) this project is measured on, one core reads ~30 GB/s
with torch's `sum()`, but numpy's OpenBLAS 0.3.31 `sgemv` (whichever core type it is told), BLIS
and `torch.mv` read 12-15 GB/s per core. Their kernels walk several weight rows at once, and a C
loop over 4 or 8 rows at once read 14-16 GB/s here too; the loop below reads one weight row at a
time, as one sequential stream, into 64 partial sums that the compiler vectorises, and reads ~30
GB/s per core like `sum()`. The pipeline's decoding of SmolLM2-135M gets 1.44x faster than the same
fused step on OpenBLAS's gemv (README, "Benchmarks").

Each output is one row's dot product, computed by one thread in a fixed order without fused
multiply-adds, so results depend neither on the thread count nor on the build or the CPU (IEEE
arithmetic in the source's order); they differ from OpenBLAS's in the last bits (another summation
order), as OpenBLAS's differ from torch's. The library is compiled once per source, compiler and
target into `$GILL_HF_CACHE/kernels/` (written under a temporary name, then renamed into place, so a
crash or a second process never leaves half a library) and loaded with ctypes. Without a compiler,
where the build fails, or with `GILL_HF_GEMV_KERNEL=0`, `streaming_gemv` returns None and callers
keep numpy's BLAS. A forked process computes on one thread (the parent's OpenMP pool does not
survive `fork`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#define LANES 64
static float row_dot(const float *w, const float *x, int64_t n) {
  float acc[LANES] = {0};
  int64_t c = 0;
  for (; c + LANES <= n; c += LANES)
    for (int k = 0; k < LANES; k++) acc[k] += w[c + k] * x[c + k];
  float tail = 0;
  for (; c < n; c++) tail += w[c] * x[c];
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int k = 0; k < width; k++) acc[k] += acc[k + width];
  return acc[0] + tail;
}

/* y[r] = sum_c w[r, c] * x[c] for a row-major float32 w of shape (rows, cols) */
void gill_gemv(const float *w, const float *x, float *y, int64_t rows, int64_t cols, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t r = 0; r < rows; r++) y[r] = row_dot(w + r * cols, x, cols);
}
"""
# Tried in order: the last two for compilers without OpenMP (one thread) or without -march=native.
# No fused multiply-adds (the loop is bound by memory, not arithmetic): every build on every machine
# then rounds the same, so the fallbacks and other CPUs give the same bits.
_FLAG_SETS = (["-O3", "-ffp-contract=off", "-march=native", "-fopenmp"], ["-O3", "-ffp-contract=off", "-march=native"],
              ["-O3", "-ffp-contract=off"])
# Below this many weights (256 KB) a product is left to numpy: a ctypes call costs ~6 us, a numpy
# `dot` under 1 us, and a matrix that small streams in a few microseconds either way (LoRA's factors).
MIN_WEIGHTS = 1 << 16
_forked_child = False  # libgomp's thread pool does not survive fork(): a child computes on one thread


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _compiler() -> list[str] | None:
    """`$CC`, else the compiler Python was built with, else `cc`, `gcc` or `clang`: the first that is on
    this machine (a recorded build compiler, such as conda's, often is not)."""
    candidates = [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"]
    for candidate in filter(None, candidates):
        try:
            command = shlex.split(candidate)
        except ValueError:  # an unbalanced quote: not a command line
            continue
        if command and shutil.which(command[0]):
            return command
    return None


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def build_kernel(directory: Path, flags: list[str], compiler: list[str], rebuild: bool = False) -> Path | None:
    """The library for `SOURCE` built with `flags` by `compiler`, in `directory`: reused when already
    there (unless `rebuild`), else written under a temporary name and renamed into place. None where
    the compiler rejects the flags. The name hashes the source, the compiler and what the flags make it
    target (its predefined macros: `-march=native` on another CPU defines others), so a cache shared
    between machines never hands one a library built for another."""
    version = _run([*compiler, "--version"]).stdout
    target = _run([*compiler, *flags, "-dM", "-E", "-x", "c", os.devnull]).stdout
    key = hashlib.sha256("\0".join([SOURCE, *compiler, *flags, version, target, platform.machine()]).encode()).hexdigest()[:16]
    library = directory / f"gill_gemv-{key}.so"
    if library.exists() and not rebuild:
        return library
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{library.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        build = _run([*compiler, *flags, "-shared", "-fPIC", "-x", "c", "-", "-o", partial], input=SOURCE)
        if build.returncode != 0 or os.path.getsize(partial) == 0:
            logger.debug("building the streaming gemv with %s failed: %s", flags, build.stderr.strip())
            return None
        os.chmod(partial, 0o755)  # mkstemp's 0600 would keep other users of a shared cache out
        os.replace(partial, library)
        return library
    finally:
        if os.path.exists(partial):  # ours: the temporary name from mkstemp above
            os.remove(partial)


def _load(library: Path) -> Callable:
    function = ctypes.CDLL(str(library)).gill_gemv
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    function.restype = None
    return function


def _load_kernel() -> tuple[Callable, list[str]] | None:
    if os.environ.get("GILL_HF_GEMV_KERNEL", "1") == "0":
        return None
    from gill_hf.embedded import cache_root

    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: CPU decoding keeps numpy's BLAS for its matrix-vector products")
        return None
    directory = cache_root() / "kernels"
    for flags in _FLAG_SETS:
        library = build_kernel(directory, flags, compiler)
        if library is None:
            continue
        try:
            return _load(library), flags
        except (OSError, AttributeError):  # a damaged file under our name: built again, once
            library = build_kernel(directory, flags, compiler, rebuild=True)
            if library is not None:
                return _load(library), flags
    logger.info("%s built no streaming gemv: CPU decoding keeps numpy's BLAS for its products", compiler[0])
    return None


@functools.cache
def streaming_gemv() -> Callable[[np.ndarray, np.ndarray, int], np.ndarray | None] | None:
    """`gemv(matrix, vector, threads)` -> `matrix @ vector` (a new float32 array) on up to `threads`
    threads, or None where the arrays are not for the kernel: it takes an aligned C-contiguous float32
    matrix of at least `MIN_WEIGHTS` weights and a contiguous float32 vector of its width. None itself
    where no compiler built the library (or anything else went wrong: the products then stay with
    numpy), or with `GILL_HF_GEMV_KERNEL=0`. `gemv.flags` names the flags its library was built with."""
    try:
        loaded = _load_kernel()
    except Exception as error:  # an unwritable cache, a hung compiler, no home directory, ...: numpy computes
        logger.info("the streaming gemv is unavailable (%s: %s); CPU decoding keeps numpy's BLAS", type(error).__name__, error)
        return None
    if loaded is None:
        return None
    function, flags = loaded
    native = np.dtype(np.float32)  # native byte order

    def gemv(matrix: np.ndarray, vector: np.ndarray, threads: int) -> np.ndarray | None:
        if (matrix.size < MIN_WEIGHTS or matrix.dtype != native or vector.dtype != native or matrix.ndim != 2
                or vector.shape != matrix.shape[1:] or not (matrix.flags.c_contiguous and matrix.flags.aligned)
                or not (vector.flags.c_contiguous and vector.flags.aligned)):
            return None
        out = np.empty(matrix.shape[0], dtype=np.float32)
        threads = 1 if _forked_child else max(1, min(int(threads), 256))
        function(matrix.ctypes.data, vector.ctypes.data, out.ctypes.data, matrix.shape[0], matrix.shape[1], threads)
        return out

    gemv.flags = flags
    return gemv


__all__ = ["MIN_WEIGHTS", "SOURCE", "build_kernel", "streaming_gemv"]
