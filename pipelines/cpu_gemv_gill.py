"""A streaming matrix-vector product for CPU decoding, built on first use with the system's C compiler.

At batch 1 every product of a decoding step is a matrix-vector product whose cost is reading the
weights once. On the 2-core AMD EPYC (Zen 4) this project is measured on, one core reads ~30 GB/s
with torch's `sum()`, but numpy's OpenBLAS 0.3.31 `sgemv` (whichever core type it is told), BLIS
and `torch.mv` read 12-15 GB/s per core: their kernels interleave several weight rows, and that
access pattern leaves half of a core's bandwidth unused. The loop below reads one weight row at a time as a single
sequential stream into 64 partial sums, which the compiler turns into SIMD multiply-adds; it reads
~30 GB/s per core like `sum()`, and the fused decoding step of SmolLM2-135M gets ~1.6x faster
(README, "Benchmarks").

Each output is one row's dot product, computed by one thread in a fixed order, so results do not
depend on the thread count; they differ from OpenBLAS's in the last bits (another summation order),
as OpenBLAS's differ from torch's. The library is compiled once per source, compiler and CPU into
`$GILL_HF_CACHE/kernels/` (written under a temporary name, then renamed into place, so a crash or a
second process never leaves half a library) and loaded with ctypes. Without a compiler, where the
build fails, or with `GILL_HF_GEMV_KERNEL=0`, `streaming_gemv` returns None and callers keep numpy's
BLAS.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SOURCE = r"""
#define LANES 64
static float row_dot(const float *w, const float *x, long n) {
  float acc[LANES] = {0};
  long c = 0;
  for (; c + LANES <= n; c += LANES)
    for (int k = 0; k < LANES; k++) acc[k] += w[c + k] * x[c + k];
  float tail = 0;
  for (; c < n; c++) tail += w[c] * x[c];
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int k = 0; k < width; k++) acc[k] += acc[k + width];
  return acc[0] + tail;
}

/* y[r] = sum_c w[r, c] * x[c] for a row-major float32 w of shape (rows, cols) */
void gill_gemv(const float *w, const float *x, float *y, long rows, long cols, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (long r = 0; r < rows; r++) y[r] = row_dot(w + r * cols, x, cols);
}
"""
# Tried in order: the last two for compilers without OpenMP (one thread) or without -march=native.
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
# Below this many weights (256 KB) a product is left to numpy: a ctypes call costs ~6 us, a numpy
# `dot` under 1 us, and a matrix that small streams in a few microseconds either way (LoRA's factors).
MIN_WEIGHTS = 1 << 16


def _cpu_identity() -> str:
    """What `-march=native` depends on, so that a cache shared between machines never hands one a
    library built for another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join([platform.machine(), platform.processor(), *dict.fromkeys(wanted)])


def build_kernel(directory: Path, flags: list[str]) -> Path | None:
    """The library for `SOURCE` built with `flags` by the system's C compiler, in `directory` (reused
    when already there); None where the compiler rejects the flags."""
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE, *compiler, *flags, version, _cpu_identity()]).encode()).hexdigest()[:16]
    library = directory / f"gill_gemv-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{library.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        build = subprocess.run([*compiler, *flags, "-shared", "-fPIC", "-x", "c", "-", "-o", partial],
                               input=SOURCE, capture_output=True, text=True, timeout=120)
        if build.returncode != 0:
            logger.debug("building the streaming gemv with %s failed: %s", flags, build.stderr.strip())
            return None
        os.replace(partial, library)
        return library
    finally:
        if os.path.exists(partial):  # ours: the temporary name from mkstemp above
            os.remove(partial)


@functools.cache
def streaming_gemv() -> Callable[[np.ndarray, np.ndarray, int], np.ndarray | None] | None:
    """`gemv(matrix, vector, threads)` -> `matrix @ vector` (a new float32 array) on up to `threads`
    threads, or None where the arrays are not for the kernel: it takes a C-contiguous float32 matrix of
    at least `MIN_WEIGHTS` weights and a contiguous float32 vector of its width. None itself where no
    flags built the library, or with `GILL_HF_GEMV_KERNEL=0`."""
    if os.environ.get("GILL_HF_GEMV_KERNEL", "1") == "0":
        return None
    from gill_hf.embedded import cache_root

    for flags in _FLAG_SETS:
        try:
            library = build_kernel(cache_root() / "kernels", flags)
            if library is not None:
                function = ctypes.CDLL(str(library)).gill_gemv
                break
        except (OSError, subprocess.SubprocessError) as error:  # no compiler, an unwritable cache, a bad library
            logger.debug("the streaming gemv is unavailable with %s: %s", flags, error)
    else:
        logger.info("no C compiler built the streaming gemv; CPU decoding keeps numpy's BLAS for its products")
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    function.restype = None

    def gemv(matrix: np.ndarray, vector: np.ndarray, threads: int) -> np.ndarray | None:
        if (matrix.size < MIN_WEIGHTS or matrix.dtype != np.float32 or vector.dtype != np.float32 or matrix.ndim != 2
                or vector.shape != matrix.shape[1:] or not matrix.flags.c_contiguous or not vector.flags.c_contiguous):
            return None
        out = np.empty(matrix.shape[0], dtype=np.float32)
        function(matrix.ctypes.data, vector.ctypes.data, out.ctypes.data, matrix.shape[0], matrix.shape[1], threads)
        return out

    return gemv


__all__ = ["MIN_WEIGHTS", "SOURCE", "build_kernel", "streaming_gemv"]
