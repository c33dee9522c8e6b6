"""Hostile and damaged original-release files: the restricted unpickler against BUILD / SETITEM /
call payloads on every global it admits (the process must stay unchanged), DAG bombs, stateless
arrays, zip bombs and bit flips in `.pth.tar` files. Budget: ~5 s."""

import codecs
import io
import pickle
import struct
import time
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from gill_hf.convert_original import load_torch_state_dict
from gill_hf.safe_loading import _ADMITTED, load_retrieval_pickle


def _unicode(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _wrap(body: bytes) -> bytes:
    """`{"paths": [], "embeddings": <body's value>}`"""
    return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _unicode("paths") + pickle.EMPTY_LIST + pickle.SETITEM
            + _unicode("embeddings") + body + pickle.SETITEM + pickle.STOP)


NEGATING_DEFAULTS = (pickle.MARK + pickle.EMPTY_DICT + _unicode("neg") + pickle.NEWTRUE + pickle.SETITEM + pickle.TUPLE)


def _payloads(module: str, name: str) -> dict[str, bytes]:
    g = _global(module, name)
    defaults_state = pickle.EMPTY_DICT + _unicode("__defaults__") + NEGATING_DEFAULTS + pickle.SETITEM
    return {
        "build_dict": g + defaults_state + pickle.BUILD,
        "build_slots": g + pickle.MARK + pickle.NONE + defaults_state + pickle.TUPLE + pickle.BUILD,
        "setitem": g + _unicode("key") + _unicode("value") + pickle.SETITEM,
        "append": g + _unicode("value") + pickle.APPEND,
        "call_text": g + pickle.MARK + _unicode("x") + pickle.TUPLE + pickle.REDUCE,
        "call_nothing": g + pickle.EMPTY_TUPLE + pickle.REDUCE,
        "call_object_dtype": g + pickle.MARK + _unicode("O") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE + pickle.REDUCE,
    }


@pytest.fixture(scope="module")
def known_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("known") / "known.pt"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0]).bfloat16()}
    torch.save(tensors, path)
    return path, tensors


def _process_unchanged(known_file) -> None:
    path, tensors = known_file
    loaded = torch.load(path, weights_only=True)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor) and not loaded[key].is_neg()
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (None,)
    assert codecs.encode("\xe9", "latin1") == b"\xe9"
    assert OrderedDict([(1, 2)]) == {1: 2} and not hasattr(OrderedDict, "key")
    assert np.frombuffer(np.float32(1.5).tobytes(), np.float32)[0] == 1.5


@pytest.mark.parametrize("admitted", sorted(_ADMITTED), ids=lambda g: ".".join(g))
def test_payloads_against_every_admitted_global_are_refused_and_change_nothing(tmp_path, known_file, admitted):
    for kind, body in _payloads(*admitted).items():
        path = tmp_path / f"cc3m_{kind}.npy"
        path.write_bytes(_wrap(body))
        with pytest.raises(ValueError):
            load_retrieval_pickle(path)
        _process_unchanged(known_file)


def test_a_file_that_sets_the_rebuild_defaults_cannot_negate_later_loads(tmp_path, known_file):
    """A known attack: BUILD on torch's rebuild function with negating metadata defaults,
    followed by an ordinary tensor in the same file."""
    rows = torch.randn(2, 4)
    good = pickle.dumps({"paths": ["a", "b"], "embeddings": list(rows)}, protocol=2)
    attack = (pickle.PROTO + b"\x02" + _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pickle.NONE
              + pickle.EMPTY_DICT + _unicode("__defaults__") + NEGATING_DEFAULTS + pickle.SETITEM + pickle.TUPLE
              + pickle.BUILD + pickle.POP)  # BUILD with a slot state: setattr(function, "__defaults__", ...)
    path = tmp_path / "cc3m_attack.npy"
    path.write_bytes(attack + good[2:])
    with pytest.raises(ValueError, match="refus"):
        load_retrieval_pickle(path)
    _process_unchanged(known_file)


def test_a_dag_of_lists_is_refused_at_once(tmp_path):
    body = pickle.MARK + _unicode("x") + pickle.LIST + pickle.BINPUT + b"\x00" + pickle.POP
    for _ in range(40):  # each level: [previous, previous] -> 2^40 strings if walked as a tree
        body += pickle.MARK + pickle.BINGET + b"\x00" + pickle.BINGET + b"\x00" + pickle.LIST + pickle.BINPUT + b"\x00" + pickle.POP
    body += pickle.BINGET + b"\x00"
    payload = (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _unicode("paths") + body + pickle.SETITEM
               + _unicode("embeddings") + pickle.EMPTY_LIST + pickle.SETITEM + pickle.STOP)
    path = tmp_path / "cc3m_dag.npy"
    path.write_bytes(payload)
    assert len(payload) < 2000
    start = time.perf_counter()
    with pytest.raises(ValueError, match="'paths' must be a list of strings"):
        load_retrieval_pickle(path)
    assert time.perf_counter() - start < 1.0


def test_stateless_and_mis_sized_arrays_are_refused(tmp_path):
    reconstruct = (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
                   + pickle.MARK + pickle.BININT1 + b"\x00" + pickle.TUPLE + pickle.SHORT_BINBYTES + b"\x01b"
                   + pickle.TUPLE3 + pickle.REDUCE)
    path = tmp_path / "cc3m_stateless.npy"
    path.write_bytes(_wrap(pickle.MARK + reconstruct + pickle.LIST))
    with pytest.raises(ValueError, match="without data"):
        load_retrieval_pickle(path)
    # A real array whose declared shape is larger than its data.
    good = pickle.dumps({"paths": ["a"], "embeddings": [np.ones(4, np.float32)]}, protocol=2)
    bad = good.replace(pickle.BININT1 + b"\x04", pickle.BININT1 + b"\x40", 1)
    assert bad != good
    path.write_bytes(bad)
    with pytest.raises(ValueError, match="does not fill its shape"):
        load_retrieval_pickle(path)


def test_real_formats_still_load(tmp_path):
    values = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    for protocol in (2, 4, 5):
        path = tmp_path / f"cc3m_{protocol}.npy"
        path.write_bytes(pickle.dumps({"paths": ["x", "y", "z"], "embeddings": list(values)}, protocol=protocol))
        paths, embeddings = load_retrieval_pickle(path)
        assert paths == ["x", "y", "z"] and torch.equal(embeddings, torch.from_numpy(values))
    path.write_bytes(pickle.dumps({"paths": ["x", "y", "z"], "embeddings": values}, protocol=4))
    assert torch.equal(load_retrieval_pickle(path)[1], torch.from_numpy(values))


def _checkpoint(tmp_path):
    path = tmp_path / "pretrained_ckpt.pth.tar"
    torch.save({"state_dict": {"model.logit_scale": torch.tensor(2.5), "w": torch.ones(64, 64)}}, path)
    return path


def test_a_compressed_torch_archive_is_refused_before_inflating(tmp_path):
    path = _checkpoint(tmp_path)
    bomb = tmp_path / "bomb.pth.tar"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        target.writestr("archive/data/999", b"\x00" * (64 << 20))  # 64 MiB that deflate to ~64 kB
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match="compressed"):
        load_torch_state_dict(bomb)


def test_a_bit_flip_in_tensor_data_is_caught_by_the_crc(tmp_path):
    path = _checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the 64 x 64 tensor's storage
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged|CRC"):
        load_torch_state_dict(path)


def test_odd_torch_files_name_the_file(tmp_path):
    path = tmp_path / "odd.pth.tar"
    torch.save({1: torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="odd.pth.tar.*named tensors"):
        load_torch_state_dict(path)
    path.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00\xffq\x01.")
    with pytest.raises(ValueError, match="odd.pth.tar"):
        load_torch_state_dict(path)
