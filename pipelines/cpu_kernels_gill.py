"""Compiled CPU kernels for decoding, built on first use with the system's C compiler: a streaming
product of a matrix with a few rows and a whole cached decoding step of a Llama model.

At batch 1 every product of a decoding step is a matrix-vector product whose cost is reading the
weights once. On the 2-core AMD EPYC (Zen 4) this project is measured on, one core reads ~30 GB/s
with torch's `sum()`, but numpy's OpenBLAS 0.3.31 `sgemv` (whichever core type it is told), BLIS
and `torch.mv` read 12-15 GB/s per core. Their kernels walk several weight rows at once, and a C
loop over 4 or 8 rows at once read 14-16 GB/s here too; `row_dot` below reads one weight row at a
time, as one sequential stream, into 64 partial sums that the compiler vectorises, and reads ~30
GB/s per core like `sum()`. `gill_product` is that loop over a matrix's rows, split between threads,
for one to `MAX_ROWS` input rows: a batch's rows are summed against each weight row while it is in
L1, in the same order as one row alone (`cpu_blas_gill.blas_product` takes it for products of that
many rows, where OpenBLAS's gemm spends most of its time packing the weights).

`gill_llama_step` is the fused step of `cpu_decode_gill` for one sequence in one call: inside a
single OpenMP parallel region, each layer's products split their rows between the threads (q/k/v as
one range of rows over the three weights where they lie, gate and up row by row with SiLU applied
as each pair is done, o and down adding into the residual stream), attention splits its query
heads, and the norms run on one thread between barriers. numpy's step spends ~2.7 ms a token in
~45 numpy calls per layer and its products restart their threads ~200 times; here a token is one
ctypes call, and SmolLM2-135M decodes 1.29x faster than the numpy step with the same gemv
(README, "Benchmarks"). Peft LoRA layers (one active adapter per layer) are applied as peft does:
`base + lora_B(lora_A(x)) * scaling`.

Each output is computed by one thread in a fixed order without fused multiply-adds, so results
depend neither on the thread count nor on the build or the CPU (IEEE arithmetic in the source's
order); they differ from OpenBLAS's and numpy's in the last bits (other summation orders), as those
differ from torch's. The library is compiled once per source, compiler and target into
`$GILL_HF_CACHE/kernels/` (written under a temporary name, then renamed into place, so a crash or a
second process never leaves half a library) and loaded with ctypes. Without a compiler, where the
build fails, or with `GILL_HF_CPU_KERNELS=0`, `cpu_kernels()` returns None and callers keep numpy. A
forked process computes on one thread (the parent's OpenMP pool does not survive `fork`).
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
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#define LANES 64
/* out[v] = sum_c w[c] * x[v * stride + c] for v < count: `lanes` partial sums per vector, added up
   in one fixed order, so a vector's sum has the same bits whatever `count` it was computed with. */
#define DOTS(name, lanes, count)                                                            \
  static void name(const float *w, const float *x, int64_t stride, int64_t n, float *out) { \
    float acc[count][lanes] = {{0}};                                                        \
    int64_t c = 0;                                                                          \
    for (; c + lanes <= n; c += lanes)                                                      \
      for (int v = 0; v < count; v++)                                                       \
        for (int k = 0; k < lanes; k++) acc[v][k] += w[c + k] * x[v * stride + c + k];      \
    for (int v = 0; v < count; v++) {                                                       \
      float tail = 0;                                                                       \
      for (int64_t t = c; t < n; t++) tail += w[t] * x[v * stride + t];                     \
      for (int width = lanes / 2; width > 0; width /= 2)                                    \
        for (int k = 0; k < width; k++) acc[v][k] += acc[v][k + width];                     \
      out[v] = acc[v][0] + tail;                                                            \
    }                                                                                       \
  }
DOTS(row_dot_1, LANES, 1)  /* weight rows: 64 partial sums keep one long stream in flight */
DOTS(row_dot_2, LANES, 2)  /* two or four vectors against a row read once (from L1 after the first) */
DOTS(row_dot_4, LANES, 4)
DOTS(head_dot_1, 16, 1)    /* attention scores: a head's 64-128 values, fewer partial sums to add up */

static float row_dot(const float *w, const float *x, int64_t n) { float out; row_dot_1(w, x, 0, n, &out); return out; }
static float head_dot(const float *w, const float *x, int64_t n) { float out; head_dot_1(w, x, 0, n, &out); return out; }

/* y[b, r] = sum_c w[r, c] * x[b, c] for a row-major float32 w (rows, cols) and a few rows x (batch,
   cols): each weight row streams from memory once for the whole batch, and each output has the bits
   of that row alone (`row_dot`'s order). */
void gill_product(const float *w, const float *x, float *y, int64_t rows, int64_t cols, int64_t batch, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float *row = w + r * cols;
    float out[4];
    int64_t b = 0;
    for (; b + 4 <= batch; b += 4) {
      row_dot_4(row, x + b * cols, cols, cols, out);
      for (int v = 0; v < 4; v++) y[(b + v) * rows + r] = out[v];
    }
    if (b + 2 <= batch) {
      row_dot_2(row, x + b * cols, cols, cols, out);
      y[b * rows + r] = out[0], y[(b + 1) * rows + r] = out[1];
      b += 2;
    }
    if (b < batch) y[b * rows + r] = row_dot(row, x + b * cols, cols);
  }
}

/* A bias-free linear layer (rows, cols) with an optional LoRA pair: a (rank, cols), b (rows, rank). */
typedef struct { const float *w, *a, *b; int64_t cols, rank; float scaling; float *low; } Proj;

static void low_rank_input(const Proj *p, const float *in) {  /* low = a @ in */
  if (p->a) for (int64_t i = 0; i < p->rank; i++) p->low[i] = row_dot(p->a + i * p->cols, in, p->cols);
}

static float proj_row(const Proj *p, int64_t r, const float *in) {  /* peft: base + lora_B(lora_A(in)) * scaling */
  float y = row_dot(p->w + r * p->cols, in, p->cols);
  return p->b ? y + row_dot(p->b + r * p->rank, p->low, p->rank) * p->scaling : y;
}

static void rms_norm(const float *x, const float *weight, float eps, int64_t n, float *out) {
  float scale = sqrtf(row_dot(x, x, n) / (float)n + eps);
  for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] / scale);
}

static void rotate(float *x, const float *cos, const float *sin, int64_t half) {  /* x * cos + rotate_half(x) * sin */
  for (int64_t i = 0; i < half; i++) {
    float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

/* One cached decoding step of a Llama model for one sequence, on `threads` threads.
   dims: layers hidden heads kv_heads head_dim intermediate vocab capacity slot capture max_rank.
   tensors, per layer: norm_1 norm_2, then q k v o gate up down, each as weight lora_a lora_b
   (NULL without LoRA); after the layers: the final norm, then the head as weight lora_a lora_b.
   ranks: each projection's LoRA rank. scalars, per layer: eps_1 eps_2 attention_scaling and the
   seven LoRA scalings; after the layers: the final eps and the head's LoRA scaling.
   keys, values: (layers, kv_heads, capacity, head_dim), position `slot` written here.
   x: the token's embedding in, the final norm's output out. scratch: hidden + 2 * heads * head_dim
   + 2 * kv_heads * head_dim + intermediate + heads * capacity + 8 * max_rank floats. */
void gill_llama_step(const float *const *tensors, const int64_t *ranks, const float *scalars, const int64_t *dims,
                     float *keys, float *values, const float *cos, const float *sin, float *x, float *scratch,
                     float *logits, float *captured, int threads) {
  const int64_t layers = dims[0], hidden = dims[1], heads = dims[2], kv_heads = dims[3], head_dim = dims[4],
                inter = dims[5], vocab = dims[6], capacity = dims[7], slot = dims[8], capture = dims[9],
                max_rank = dims[10];
  const int64_t q_rows = heads * head_dim, kv_rows = kv_heads * head_dim, group = heads / kv_heads;
  float *h = scratch, *qkv = h + hidden, *attended = qkv + q_rows + 2 * kv_rows, *act = attended + q_rows,
        *scores = act + inter, *low = scores + heads * capacity;
  if (capture == 0) memcpy(captured, x, hidden * sizeof(float));
  #pragma omp parallel num_threads(threads) if (threads > 1)
  {
    for (int64_t l = 0; l < layers; l++) {
      const float *const *t = tensors + 23 * l;
      const float *s = scalars + 10 * l;
      Proj p[7];
      for (int j = 0; j < 7; j++) {
        const int64_t cols = j == 3 ? q_rows : j == 6 ? inter : hidden;
        p[j] = (Proj){t[2 + 3 * j], t[3 + 3 * j], t[4 + 3 * j], cols, ranks[7 * l + j], s[3 + j], low + j * max_rank};
      }
      float *layer_keys = keys + l * kv_heads * capacity * head_dim, *layer_values = values + l * kv_heads * capacity * head_dim;
      #pragma omp single
      {
        rms_norm(x, t[0], s[0], hidden, h);
        for (int j = 0; j < 3; j++) low_rank_input(&p[j], h);
      }
      #pragma omp for schedule(static)
      for (int64_t r = 0; r < q_rows + 2 * kv_rows; r++)
        qkv[r] = r < q_rows ? proj_row(&p[0], r, h) : r < q_rows + kv_rows ? proj_row(&p[1], r - q_rows, h)
                                                                           : proj_row(&p[2], r - q_rows - kv_rows, h);
      #pragma omp single
      for (int64_t g = 0; g < kv_heads; g++) {  /* the new position's keys (rotated) and values into the cache */
        float *k = qkv + q_rows + g * head_dim;
        rotate(k, cos, sin, head_dim / 2);
        memcpy(layer_keys + (g * capacity + slot) * head_dim, k, head_dim * sizeof(float));
        memcpy(layer_values + (g * capacity + slot) * head_dim, qkv + q_rows + kv_rows + g * head_dim,
               head_dim * sizeof(float));
      }
      #pragma omp for schedule(static)
      for (int64_t j = 0; j < heads; j++) {  /* grouped-query attention: query head j reads kv head j / group */
        const float *cached_keys = layer_keys + j / group * capacity * head_dim,
                    *cached_values = layer_values + j / group * capacity * head_dim;
        float *q = qkv + j * head_dim, *score = scores + j * capacity, *out = attended + j * head_dim;
        float top = -INFINITY, total = 0;
        rotate(q, cos, sin, head_dim / 2);
        for (int64_t i = 0; i <= slot; i++) {
          score[i] = head_dot(q, cached_keys + i * head_dim, head_dim) * s[2];
          top = score[i] > top ? score[i] : top;
        }
        for (int64_t i = 0; i <= slot; i++) total += score[i] = expf(score[i] - top);
        for (int64_t c = 0; c < head_dim; c++) out[c] = 0;
        for (int64_t i = 0; i <= slot; i++) {
          const float weight = score[i] / total, *value = cached_values + i * head_dim;
          for (int64_t c = 0; c < head_dim; c++) out[c] += weight * value[c];
        }
      }
      if (p[3].a) {
        #pragma omp single
        low_rank_input(&p[3], attended);
      }
      #pragma omp for schedule(static)
      for (int64_t r = 0; r < hidden; r++) x[r] = x[r] + proj_row(&p[3], r, attended);
      #pragma omp single
      {
        rms_norm(x, t[1], s[1], hidden, h);
        low_rank_input(&p[4], h);
        low_rank_input(&p[5], h);
      }
      #pragma omp for schedule(static)
      for (int64_t r = 0; r < inter; r++) {  /* SiLU(gate) * up, row by row */
        const float g = proj_row(&p[4], r, h);
        act[r] = g / (1.0f + expf(-g)) * proj_row(&p[5], r, h);
      }
      if (p[6].a) {
        #pragma omp single
        low_rank_input(&p[6], act);
      }
      #pragma omp for schedule(static)
      for (int64_t r = 0; r < hidden; r++) x[r] = x[r] + proj_row(&p[6], r, act);
      if (l + 1 == capture && capture < layers) {
        #pragma omp single nowait
        memcpy(captured, x, hidden * sizeof(float));
      }
    }
    const float *const *t = tensors + 23 * layers;
    Proj head = {t[1], t[2], t[3], hidden, ranks[7 * layers], scalars[10 * layers + 1], low + 7 * max_rank};
    #pragma omp single
    {
      rms_norm(x, t[0], scalars[10 * layers], hidden, h);
      low_rank_input(&head, h);
    }
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < vocab; r++) logits[r] = proj_row(&head, r, h);
  }
  memcpy(x, h, hidden * sizeof(float));
  if (capture == layers) memcpy(captured, x, hidden * sizeof(float));
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
# Up to this many rows a product streams each weight row once for all of them (measured on the LM's
# 211 products, 2 threads: 18, 22 and 45 ms at 2, 4 and 8 rows against 54, 59 and 61 ms for
# OpenBLAS's gemm, whose packing of the weights dominates at so few rows); more rows are a BLAS gemm.
MAX_ROWS = 8
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
    library = directory / f"gill_cpu-{key}.so"
    if library.exists() and not rebuild:
        return library
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{library.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        build = _run([*compiler, *flags, "-shared", "-fPIC", "-x", "c", "-", "-o", partial, "-lm"], input=SOURCE)
        if build.returncode != 0 or os.path.getsize(partial) == 0:
            logger.debug("building the CPU kernels with %s failed: %s", flags, build.stderr.strip())
            return None
        os.chmod(partial, 0o755)  # mkstemp's 0600 would keep other users of a shared cache out
        os.replace(partial, library)
        return library
    finally:
        if os.path.exists(partial):  # ours: the temporary name from mkstemp above
            os.remove(partial)


def _load(library: Path) -> ctypes.CDLL:
    loaded = ctypes.CDLL(str(library))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    loaded.gill_product.argtypes = [pointer, pointer, pointer, size, size, size, ctypes.c_int]
    loaded.gill_llama_step.argtypes = [pointer] * 12 + [ctypes.c_int]
    loaded.gill_product.restype = loaded.gill_llama_step.restype = None
    return loaded


def _load_kernels() -> tuple[ctypes.CDLL, list[str]] | None:
    if os.environ.get("GILL_HF_CPU_KERNELS", "1") == "0":
        return None
    from gill_hf.embedded import cache_root

    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: CPU decoding keeps numpy's BLAS and numpy's step")
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
    logger.info("%s built no CPU kernels: CPU decoding keeps numpy's BLAS and numpy's step", compiler[0])
    return None


def _threads(threads: int) -> int:
    return 1 if _forked_child else max(1, min(int(threads), 256))


def _address(array: np.ndarray | None) -> int:
    return 0 if array is None else array.ctypes.data


def _kernel_array(array: np.ndarray, ndim: int) -> bool:
    """An array the C code can read as written: aligned, C-contiguous, native float32."""
    return (array.dtype == np.dtype(np.float32) and array.ndim == ndim and array.flags.c_contiguous
            and array.flags.aligned)


class CpuKernels:
    """The compiled CPU kernels (from `cpu_kernels()`); `flags` names the flags the library was built with."""

    def __init__(self, library: ctypes.CDLL, flags: list[str]):
        self.library, self.flags = library, flags

    def product(self, matrix: np.ndarray, rows: np.ndarray, threads: int) -> np.ndarray | None:
        """`rows @ matrix.T` (a new float32 array) on up to `threads` threads, or None where the arrays
        are not for the kernel: it takes an aligned C-contiguous float32 matrix of at least
        `MIN_WEIGHTS` weights and 1 to `MAX_ROWS` aligned C-contiguous float32 rows of its width. Each
        output row has the same bits as that row's product alone."""
        if (matrix.size < MIN_WEIGHTS or not _kernel_array(matrix, 2) or not _kernel_array(rows, 2)
                or rows.shape[1:] != matrix.shape[1:] or not 1 <= rows.shape[0] <= MAX_ROWS):
            return None
        out = np.empty((rows.shape[0], matrix.shape[0]), dtype=np.float32)
        self.library.gill_product(matrix.ctypes.data, rows.ctypes.data, out.ctypes.data, matrix.shape[0],
                                  matrix.shape[1], rows.shape[0], _threads(threads))
        return out

    def llama_step(self, step: LlamaStepTensors, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, slot: int,
                   threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One cached decoding step of the Llama model in `step` (started on a KV cache) for one
        sequence: `x` (the token's embedding, `(hidden,)`, overwritten), the rotary `cos`/`sin` of its
        position (`(head_dim,)`), its `slot` in the KV cache. Returns the logits, the final norm's output
        (`x`) and the hidden state of layer `step.capture`."""
        hidden, head_dim, capacity = step.hidden, step.head_dim, step.capacity
        if step.keys is None or not all(_kernel_array(array, 1) for array in (x, cos, sin)) or not x.flags.writeable or (
                x.shape != (hidden,) or cos.shape != (head_dim,) or sin.shape != (head_dim,) or not 0 <= slot < capacity):
            raise ValueError("llama_step: arrays of the wrong shape or layout for this model, or a step not started")
        step.dims[8] = slot
        logits, captured = np.empty(step.vocab, np.float32), np.empty(hidden, np.float32)
        self.library.gill_llama_step(*step.addresses, cos.ctypes.data, sin.ctypes.data, x.ctypes.data,
                                     step.scratch.ctypes.data, logits.ctypes.data, captured.ctypes.data, _threads(threads))
        return logits, x, captured


class LlamaStepTensors:
    """What `CpuKernels.llama_step` reads, laid out for its C function and checked against the shapes it
    assumes: each layer as `(norm_1, norm_2, [(weight, lora_a, lora_b, lora_scaling) for q k v o gate up
    down], eps_1, eps_2, attention_scaling)`, then the final norm, its eps and the head `(weight,
    lora_a, lora_b, lora_scaling)` (lora_a/lora_b None without LoRA); `capture`: the hidden state
    returned (0 the embeddings, `len(layers)` the final norm's output). Raises ValueError for arrays
    the C code cannot read as they are (another dtype, strided, unaligned) or of inconsistent shapes.
    `start(keys, values)` binds a KV cache. It keeps every array alive while it holds their addresses."""

    def __init__(self, layers: list, final_norm: np.ndarray, final_eps: float, head: tuple, num_heads: int,
                 num_kv_heads: int, head_dim: int, capture: int):
        hidden, intermediate, vocab = final_norm.shape[0], layers[0][2][4][0].shape[0], head[0].shape[0]
        q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
        if num_kv_heads < 1 or num_heads % num_kv_heads or head_dim % 2 or not 0 <= capture <= len(layers):
            raise ValueError("LlamaStepTensors: heads, key/value heads, head_dim or capture out of range")
        shapes = [(q_rows, hidden), (kv_rows, hidden), (kv_rows, hidden), (hidden, q_rows), (intermediate, hidden),
                  (intermediate, hidden), (hidden, intermediate)]
        checked = [(final_norm, (hidden,))]
        for norm_1, norm_2, projections, *_ in layers:
            checked += [(norm_1, (hidden,)), (norm_2, (hidden,))]
            checked += [item for projection, shape in zip(projections, shapes, strict=True) for item in _projection_arrays(projection, shape)]
        checked += _projection_arrays(head, (vocab, hidden))
        for array, shape in checked:
            if not _kernel_array(array, len(shape)) or array.shape != shape:
                raise ValueError("LlamaStepTensors: every tensor must be an aligned C-contiguous float32 array of the "
                                 f"model's shape; got {array.dtype} {array.shape} (expected {shape}), strides {array.strides}")
        self.arrays = [array for array, _ in checked]
        projections = [projection for layer in layers for projection in layer[2]] + [head]
        addresses, ranks, scalars = [], [], []
        for norm_1, norm_2, layer_projections, eps_1, eps_2, attention_scaling in layers:
            addresses += [_address(norm_1), _address(norm_2)]
            scalars += [eps_1, eps_2, attention_scaling]
            for weight, lora_a, lora_b, lora_scaling in layer_projections:
                addresses += [_address(weight), _address(lora_a), _address(lora_b)]
                ranks.append(0 if lora_a is None else lora_a.shape[0])
                scalars.append(lora_scaling)
        addresses += [_address(final_norm), *(_address(array) for array in head[:3])]
        ranks.append(0 if head[1] is None else head[1].shape[0])
        scalars += [final_eps, head[3]]
        self.tensors = np.array(addresses, dtype=np.uintp)
        self.ranks, self.scalars = np.array(ranks, dtype=np.int64), np.array(scalars, dtype=np.float32)
        self.num_layers, self.hidden, self.num_heads, self.num_kv_heads = len(layers), hidden, num_heads, num_kv_heads
        self.head_dim, self.intermediate, self.vocab, self.capture = head_dim, intermediate, vocab, capture
        self.max_rank = int(max(ranks))
        self.keys = self.values = None
        self.capacity = 0

    def start(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Binds the KV cache `keys`/`values`, `(layers, kv_heads, capacity, head_dim)` float32 arrays."""
        capacity = keys.shape[2] if keys.ndim == 4 else 0
        shape = (self.num_layers, self.num_kv_heads, capacity, self.head_dim)
        if not all(_kernel_array(array, 4) and array.shape == shape and array.flags.writeable for array in (keys, values)):
            raise ValueError(f"LlamaStepTensors.start: the KV cache must be two writeable float32 arrays of shape {shape}")
        self.keys, self.values, self.capacity = keys, values, capacity
        self.dims = np.array([self.num_layers, self.hidden, self.num_heads, self.num_kv_heads, self.head_dim,
                              self.intermediate, self.vocab, capacity, 0, self.capture, self.max_rank], dtype=np.int64)
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scratch = np.zeros(self.hidden + 2 * q_rows + 2 * kv_rows + self.intermediate + self.num_heads * capacity
                                + 8 * self.max_rank, dtype=np.float32)
        # the C function's first six arguments, the same at every step (`.ctypes` costs microseconds a call)
        self.addresses = [array.ctypes.data for array in (self.tensors, self.ranks, self.scalars, self.dims, keys, values)]


def _projection_arrays(projection: tuple, shape: tuple[int, int]) -> list[tuple[np.ndarray, tuple]]:
    """A projection's arrays with the shapes the C code assumes: the weight, and LoRA's (rank, cols) and (rows, rank)."""
    weight, lora_a, lora_b, _ = projection
    if (lora_a is None) != (lora_b is None):
        raise ValueError("LlamaStepTensors: a LoRA pair needs both lora_a and lora_b")
    if lora_a is None:
        return [(weight, shape)]
    rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
    return [(weight, shape), (lora_a, (rank, shape[1])), (lora_b, (shape[0], rank))]


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled CPU kernels, built on first use into `$GILL_HF_CACHE/kernels/`; None where no
    compiler built them (or anything else went wrong: CPU decoding then stays with numpy), or with
    `GILL_HF_CPU_KERNELS=0`."""
    try:
        loaded = _load_kernels()
    except Exception as error:  # an unwritable cache, a hung compiler, no home directory, ...: numpy computes
        logger.info("the CPU kernels are unavailable (%s: %s); CPU decoding keeps numpy", type(error).__name__, error)
        return None
    return None if loaded is None else CpuKernels(*loaded)


__all__ = ["MAX_ROWS", "MIN_WEIGHTS", "SOURCE", "CpuKernels", "LlamaStepTensors", "build_kernel", "cpu_kernels"]
