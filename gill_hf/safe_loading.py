"""Reading the original GILL release's pickles without ever trusting them.

- `load_retrieval_pickle`: the retrieval file (`cc3m_embeddings_urls.npy`, a pickle of
  `{"paths": [...], "embeddings": [...]}` despite its name) through `RestrictedUnpickler`. The
  unpickler never hands the stream a real library callable (a stream can `BUILD` or `SETITEM` on
  whatever `find_class` returns: given the real `torch._utils._rebuild_tensor_v2` it could set that
  function's defaults and change every later `torch.load` in the process). It returns sealed
  stand-ins that refuse `BUILD`/`SETITEM`/attribute writes, and builds arrays and tensors itself
  from raw bytes; the result is checked against the file's schema, so nothing nested (a 2^40-item
  DAG of lists) is ever walked.
- `check_torch_archive`: before `torch.load(weights_only=True)` of a `.pth.tar`, the zip is checked:
  stored members only (what `torch.save` writes; a deflated member could inflate to any size),
  declared sizes within the file, and every member's CRC-32 (torch itself does not check them).
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

# numpy dtype names a numeric embedding file can hold (object and structured dtypes are refused).
_NUMERIC_DTYPES = {f"{kind}{size}" for kind, sizes in (("f", (2, 4, 8)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8))) for size in sizes}
_NUMERIC_DTYPES |= {"b1"}


class _Sealed:
    """A stand-in for an admitted global: callable, but the stream cannot mutate it."""

    __slots__ = ("_name", "_function")

    def __init__(self, name: str, function):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_function", function)

    def __call__(self, *args):
        return self._function(*args)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refusing BUILD on the global {self._name}")

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"refusing to set attribute {name!r} of the global {self._name}")

    def __setitem__(self, key, value):
        raise pickle.UnpicklingError(f"refusing SETITEM on the global {self._name}")

    def __reduce__(self):
        raise pickle.PicklingError(f"{self._name} stand-ins are not picklable")


class _Pending:
    """An object the stream is building (array, dtype): takes exactly one BUILD, nothing else."""

    __slots__ = ("args", "state", "kind")

    def __init__(self, kind: str, args: tuple):
        self.kind, self.args, self.state = kind, args, None

    def __setstate__(self, state):
        if self.state is not None:
            raise pickle.UnpicklingError(f"refusing a second BUILD on a {self.kind}")
        if state is None:
            raise pickle.UnpicklingError(f"refusing an empty BUILD state for a {self.kind}")
        self.state = state


def _fail(message: str):
    raise pickle.UnpicklingError(message)


# ----- constructors the stream may call (each validates its arguments) ----------------------------


def _ordered_dict(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
        _fail("collections.OrderedDict called with unexpected arguments")
    return OrderedDict(*args)


def _latin1_encode(text, encoding="latin1", *rest):
    if rest or not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        _fail("_codecs.encode is admitted for (str, 'latin1') only")
    return codecs.encode(text, "latin1")


def _dtype(name, align=False, copy=True, *rest):
    if rest or name not in _NUMERIC_DTYPES or not isinstance(align, bool) or not isinstance(copy, bool):
        _fail(f"refusing numpy dtype {name!r} (numeric dtypes only)")
    return _Pending("numpy dtype", (name,))


def _reconstruct(cls, shape, typecode, *rest):
    if rest or not (isinstance(cls, _Sealed) and cls._name == "numpy.ndarray") or shape != (0,) or typecode not in (b"b", "b"):
        _fail("numpy _reconstruct called with unexpected arguments")
    return _Pending("numpy array", ())


def _frombuffer(buffer, dtype, shape, order, *rest):
    array = _Pending("numpy array", ())
    array.state = (1, shape, dtype, order == "F", buffer)
    if rest:
        _fail("numpy _frombuffer called with unexpected arguments")
    return array


def _scalar(dtype, data=None, *rest):
    resolved = _resolve_dtype(dtype)
    if rest or not isinstance(data, bytes) or len(data) != resolved.itemsize:
        _fail("numpy scalar called with unexpected arguments")
    return np.frombuffer(data, dtype=resolved)[0]


def _storage_from_bytes(data):
    if not isinstance(data, bytes):
        _fail("torch.storage._load_from_bytes needs bytes")
    storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        _fail("torch.storage._load_from_bytes did not hold a storage")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *rest):
    """Builds a tensor view of `storage` from checked sizes (never torch's own rebuild function)."""
    if rest or not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        _fail("torch._utils._rebuild_tensor_v2 called with unexpected arguments")
    if hooks not in (None, OrderedDict()) or metadata not in (None, {}, OrderedDict()) or requires_grad is not False:
        _fail("refusing a tensor with hooks, metadata or requires_grad")
    ints = lambda values: isinstance(values, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)  # noqa: E731
    if not (isinstance(offset, int) and offset >= 0 and ints(size) and ints(stride) and len(size) == len(stride)):
        _fail("torch tensor with invalid offset, size or stride")
    dtype = storage.dtype if isinstance(storage, torch.TypedStorage) else torch.uint8
    untyped = storage._untyped_storage if isinstance(storage, torch.TypedStorage) else storage
    elements = untyped.nbytes() // torch.empty((), dtype=dtype).element_size()
    if all(size) and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= elements:
        _fail("torch tensor reaches outside its storage")
    return torch.empty((0,), dtype=dtype).set_(untyped, offset, size, stride)


_ADMITTED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _dtype,
    ("numpy", "ndarray"): lambda *args: _fail("numpy.ndarray is only an argument of _reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what the reference's retrieval files contain (builtin containers,
    `collections.OrderedDict`, numpy arrays under numpy-1 and numpy-2 names, `_codecs.encode`, torch
    tensors), each as a sealed stand-in. Every other global is refused before anything runs."""

    def find_class(self, module: str, name: str) -> Any:
        function = _ADMITTED.get((module, name))
        if function is None:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' from a retrieval-embedding file")
        return _Sealed(f"{module}.{name}", function)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id (not a plain pickle)")


# ----- materialising what the stream built ---------------------------------------------------------


def _resolve_dtype(value) -> np.dtype:
    if not isinstance(value, _Pending) or value.kind != "numpy dtype":
        _fail("expected a numpy dtype")
    dtype = np.dtype(value.args[0])
    if value.state is not None:
        state = value.state
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[1] not in ("<", ">", "|", "="):
            _fail("invalid numpy dtype state")
        if state[1] in "<>":
            dtype = dtype.newbyteorder(state[1])
    return dtype


def _resolve_array(value: _Pending) -> np.ndarray:
    """A numpy array from its BUILD state, from raw bytes; an array without state (whose memory
    numpy would leave uninitialised) is refused."""
    if value.state is None:
        _fail("refusing a numpy array without data (stateless)")
    state = value.state
    if not isinstance(state, tuple) or len(state) != 5:
        _fail("invalid numpy array state")
    _, shape, dtype, fortran, data = state
    dtype = _resolve_dtype(dtype)
    if isinstance(data, (bytearray, pickle.PickleBuffer)):  # protocol 5 writes array data as a bytearray
        data = bytes(data.raw() if isinstance(data, pickle.PickleBuffer) else data)
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape) and isinstance(data, bytes)):
        _fail("invalid numpy array shape or data")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
        _fail(f"numpy array data ({len(data)} bytes) does not fill its shape {shape}")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _embedding_rows(value, path: str) -> torch.Tensor:
    if isinstance(value, _Pending) and value.kind == "numpy array":
        array = _resolve_array(value)
        if array.ndim != 2:
            raise ValueError(f"{path!r}: 'embeddings' as one array must be 2-D, got shape {array.shape}.")
        return torch.from_numpy(array.astype(np.float32))
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{path!r}: 'embeddings' must be a list of vectors or a 2-D array.")
    rows = []
    for i, row in enumerate(value):
        if isinstance(row, _Pending) and row.kind == "numpy array":
            row = torch.from_numpy(_resolve_array(row).astype(np.float32))
        elif isinstance(row, torch.Tensor) and row.is_floating_point():
            row = row.float()
        else:
            raise ValueError(f"{path!r}: 'embeddings[{i}]' is a {type(row).__name__}, expected a float array or tensor.")
        if row.numel() == 0 or row.ndim > 2 or (row.ndim == 2 and row.shape[0] != 1):
            raise ValueError(f"{path!r}: 'embeddings[{i}]' has shape {tuple(row.shape)}, expected a vector.")
        rows.append(row.reshape(-1))
    if not rows:
        return torch.empty(0, 0)
    if len({r.shape[0] for r in rows}) != 1:
        raise ValueError(f"{path!r}: the embedding vectors differ in length.")
    return torch.stack(rows)


def load_retrieval_pickle(path: str | os.PathLike) -> tuple[list[str], torch.Tensor]:
    """`(paths, embeddings)` of a reference retrieval file, or a `ValueError` naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            payload = RestrictedUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path!r} was refused: {error}") from error
    except Exception as error:  # a malformed stream fails in many ways; all of them mean "not this format"
        raise ValueError(f"{path!r} is truncated or corrupt ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or not {"paths", "embeddings"} <= set(payload):
        raise ValueError(f"{path!r} must hold a dict with 'paths' and 'embeddings'.")
    paths = payload["paths"]
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{path!r}: 'paths' must be a list of strings.")
    try:
        embeddings = _embedding_rows(payload["embeddings"], path)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path!r} was refused: {error}") from error
    if len(paths) != embeddings.shape[0]:
        raise ValueError(f"{path!r}: {len(paths)} paths but {embeddings.shape[0]} embeddings.")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{path!r}: the embeddings hold NaN or infinite values.")
    return list(paths), embeddings


# ----- torch checkpoints ------------------------------------------------------------------------------


def check_torch_archive(path: str | os.PathLike) -> None:
    """Checks a zip-format torch checkpoint before `torch.load` reads it: stored members only,
    declared sizes within the file, every CRC-32 right. A legacy (non-zip) checkpoint passes through
    (torch reads it without inflating anything)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        return
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            for info in members:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{path!r}: member {info.filename!r} is compressed; torch.save stores members uncompressed.")
            if sum(info.file_size for info in members) > size:
                raise ValueError(f"{path!r} declares more data than the file holds (a zip bomb or a damaged file).")
            for info in members:
                with archive.open(info) as member:  # reading to the end checks the CRC-32
                    while member.read(1 << 22):
                        pass
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path!r} is damaged: {error}") from error


__all__ = ["RestrictedUnpickler", "check_torch_archive", "load_retrieval_pickle"]
