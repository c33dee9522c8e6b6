"""Webdataset tar shards as `img2dataset` writes them (`{key}.jpg`, `{key}.txt`, `{key}.json`),
streamed through `datasets`, with generation targets in parallel shards joined by key.

- `load_webdataset`: a `datasets.IterableDataset` with one data source per shard, so that
  `accelerate` gives each process its own shards (`IterableDataset.shard`), `DataLoader` workers
  split a process's shards again, and `state_dict()` / `load_state_dict()` resume mid-epoch by
  skipping whole consumed shards. The tar reader is our own rather than `load_dataset("webdataset")`
  because that builder stops the whole stream on a truncated tar: here a bad shard yields one
  marker row (`skip_reason="bad_shard"`) that `GillDataCollator` counts, and the run goes on;
  a sample without an image reaches the collator as a missing image (skipped, counted).
- `precompute_shard_targets` (`gill-hf precompute-targets --webdataset`): one output shard per
  input shard, holding `{key}.gen_target.npy` (fp16; `{key}.gen_pooled_target.npy` for decoders
  with a pooled vector), written under a temporary name and renamed, so a shard is whole or absent
  and an interrupted run continues where it stopped. Work is split across `accelerate launch`
  processes and `--num_proc` local processes.
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing
import os
import re
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TARGET_EXTENSION = "gen_target.npy"
POOLED_TARGET_EXTENSION = "gen_pooled_target.npy"
# webdataset's grouping rule: the key is everything up to the first dot of the file name
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class BadShardError(RuntimeError):
    """A shard that cannot be read to its end (truncated or corrupt tar)."""


def list_shards(shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """A folder (its `*.tar`), a glob, a comma-separated string, or a list of paths -> sorted paths."""
    if isinstance(shards, (str, os.PathLike)):
        shards = os.fspath(shards)
        if os.path.isdir(shards):
            found = glob.glob(os.path.join(shards, "*.tar"))
        else:
            found = [path for part in shards.split(",") if part.strip() for path in (glob.glob(part.strip()) or [part.strip()])]
    else:
        found = [os.fspath(path) for path in shards]
    found = sorted(set(found))
    if not found:
        raise ValueError(f"`shards`: no .tar files found in {shards!r}.")
    names = [os.path.basename(path) for path in found]
    if len(set(names)) != len(names):
        raise ValueError("`shards`: two shards share a file name; target shards are named after their input shard, so "
                         "names must be unique.")
    return found


def iter_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of an uncompressed tar read front to back
    (consecutive files with the same key form a sample). Raises `BadShardError` where the archive
    breaks, having yielded the samples completed before that point. `tarfile` ends quietly at a
    truncated header, so the end-of-archive marker (two zero blocks) must be there too."""
    key, files = None, {}
    try:
        with tarfile.open(path, mode="r|") as archive:
            for member in archive:
                match = _KEY_AND_EXTENSION.match(member.name)
                if not member.isfile() or match is None:
                    continue
                if match.group(1) != key:
                    if key is not None:
                        yield key, files
                    key, files = match.group(1), {}
                files[match.group(2).lower()] = archive.extractfile(member).read()
            end = archive.offset
        if os.path.getsize(path) < end + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError("truncated (no end-of-archive marker)")
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise BadShardError(f"{path}: {error}") from error
    if key is not None:
        yield key, files


class _TargetShard:
    """Random access to one target shard's arrays by key (its headers are read once; data on demand)."""

    def __init__(self, path: str | None):
        self.archive, self.members = None, {}
        if path is None or not os.path.isfile(path):
            return
        try:
            self.archive = tarfile.open(path, mode="r:")
            self.members = {m.name: m for m in self.archive.getmembers() if m.isfile()}
        except (tarfile.TarError, EOFError, OSError) as error:  # its keys count as missing targets
            logger.warning(f"Target shard {path} cannot be read ({error}); its samples have no target.")

    def get(self, key: str, extension: str) -> bytes | None:
        member = self.members.get(f"{key}.{extension}")
        return self.archive.extractfile(member).read() if member is not None else None

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()


def _caption(files: dict[str, bytes]) -> str | None:
    """The sample's `.txt` as text; None when absent or not UTF-8 (the collator skips it, counted)."""
    try:
        return files["txt"].decode("utf-8").strip() if "txt" in files else None
    except UnicodeDecodeError:
        return None


def _stream_examples(shards: list[str], targets_dir: str | None = None) -> Iterator[dict]:
    """The rows of `load_webdataset` (a generator over a list of shards, which `datasets` splits)."""
    for shard in shards:
        targets = _TargetShard(os.path.join(targets_dir, os.path.basename(shard)) if targets_dir else None)
        try:
            for key, files in iter_samples(shard):
                image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
                row = {"__key__": key, "__url__": shard, "caption": _caption(files), "skip_reason": None,
                       "image": {"bytes": image, "path": None} if image is not None else None}
                if targets_dir:
                    row["gen_targets"] = targets.get(key, TARGET_EXTENSION)
                    row["gen_pooled_targets"] = targets.get(key, POOLED_TARGET_EXTENSION)
                yield row
        except BadShardError as error:
            logger.warning(f"Bad shard, the rest of it is skipped: {error}")
            row = {"__key__": None, "__url__": shard, "caption": None, "image": None, "skip_reason": "bad_shard"}
            if targets_dir:
                row.update(gen_targets=None, gen_pooled_targets=None)
            yield row
        finally:
            targets.close()


def load_webdataset(shards: str | os.PathLike | Sequence[str], targets_dir: str | os.PathLike | None = None):
    r"""
    Streams `img2dataset`-style webdataset shards as a `datasets.IterableDataset` of raw rows for
    [`GillDataCollator`]: `caption` (the `.txt`), `image` (the first of `.jpg/.jpeg/.png/.webp`, as
    an undecoded `{"bytes", "path"}` cell), `__key__`, `__url__` and, given `targets_dir` (written
    by `gill-hf precompute-targets --webdataset`), `gen_targets` / `gen_pooled_targets` as `.npy`
    bytes joined by key (None where the key has no target: the collator skips and counts it).

    Example:

    ```python
    >>> from gill_hf.shards import load_webdataset
    >>> stream = load_webdataset("shards/", targets_dir="shards_targets/")  # doctest: +SKIP
    >>> stream.n_shards  # doctest: +SKIP
    8
    ```
    """
    import datasets

    paths = list_shards(shards)
    features = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string"), "caption": datasets.Value("string"),
                "image": datasets.Image(decode=False), "skip_reason": datasets.Value("string")}
    kwargs = {"shards": paths}
    if targets_dir is not None:
        if not os.path.isdir(targets_dir):
            raise ValueError(f"`targets_dir`: {os.fspath(targets_dir)!r} is not a folder.")
        features.update(gen_targets=datasets.Value("binary"), gen_pooled_targets=datasets.Value("binary"))
        kwargs["targets_dir"] = os.fspath(targets_dir)
    return datasets.IterableDataset.from_generator(_stream_examples, features=datasets.Features(features), gen_kwargs=kwargs)


def check_shards_for_processes(dataset, num_processes: int) -> None:
    """Each process must get whole shards, the same number each (accelerate then splits by shard,
    and every process runs the same number of steps per epoch): a clear error otherwise."""
    shards = getattr(dataset, "n_shards", None)
    if num_processes > 1 and shards is not None and shards % num_processes:
        raise ValueError(f"{shards} shards cannot be split evenly over {num_processes} processes: each process reads whole "
                         f"shards, so write a multiple of {num_processes} shards (img2dataset's --number_sample_per_shard), "
                         "or pass that many shard paths.")


# ----- resuming a stream mid-epoch ------------------------------------------------------------------


STREAM_STATE_FILE = "stream_state-{rank}.json"


class StreamStateCallback(TrainerCallback):
    """Resumes a streamed dataset (`datasets.IterableDataset`, one process's shards) mid-epoch from
    its own `state_dict()`: each training batch carries the state after its last example
    (`GillDataCollator.stream`), the trainer keeps the last trained batch's, each process saves it
    in every checkpoint (`stream_state-<rank>.json`), and a resumed run loads it into the stream
    before iterating, so consumed shards are never read again and Trainer skips no batches
    (`GillTrainer.get_resumed_dataloader`). Needs `dataloader_num_workers=0` (the state is read in
    the main process); otherwise resuming falls back to Trainer's re-reading skip."""

    def __init__(self, trainer, resume_from_checkpoint: str | None = None):
        self.trainer, self.resume_from_checkpoint = trainer, resume_from_checkpoint

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        import datasets

        stream = getattr(train_dataloader, "dataset", None)
        if not isinstance(stream, datasets.IterableDataset) or args.dataloader_num_workers:
            return
        self.trainer.data_collator.stream = stream
        if self.resume_from_checkpoint:
            path = os.path.join(self.resume_from_checkpoint, STREAM_STATE_FILE.format(rank=args.process_index))
            if os.path.isfile(path):
                with open(path) as f:
                    stream.load_state_dict(json.load(f))
                self.trainer.stream_resumed = True
            else:
                logger.warning(f"{path} does not exist: resuming re-reads the stream up to the checkpoint's step.")

    def on_save(self, args, state, control, **kwargs):
        position = getattr(self.trainer, "stream_position", None)
        if position is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            with open(os.path.join(folder, STREAM_STATE_FILE.format(rank=args.process_index)), "w") as f:
                json.dump(position, f)


# ----- targets ---------------------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def _write_target_shard(shard: str, output_dir: str, add_targets) -> dict[str, int]:
    """One input shard -> `output_dir/<its name>` (skipped when that file exists: a resumed run)."""
    import datasets

    output = os.path.join(output_dir, os.path.basename(shard))
    if os.path.isfile(output):
        return {"shards_done_before": 1}
    keys, captions, counts = [], [], {"samples": 0, "no_caption": 0, "bad_shards": 0}
    try:
        for key, files in iter_samples(shard):
            counts["samples"] += 1
            caption = _caption(files)
            if caption:
                keys.append(key)
                captions.append(caption)
            else:
                counts["no_caption"] += 1
    except BadShardError as error:
        logger.warning(f"Bad shard, targets for the part before the break only: {error}")
        counts["bad_shards"] += 1
    rows = add_targets(datasets.Dataset.from_dict({"caption": captions}), "caption") if captions else None
    temporary = f"{output}.tmp-{os.getpid()}"
    with tarfile.open(temporary, mode="w") as archive:
        for i, key in enumerate(keys):
            for column, extension in (("gen_targets", TARGET_EXTENSION), ("gen_pooled_targets", POOLED_TARGET_EXTENSION)):
                if column in rows.column_names:
                    data = _npy_bytes(np.asarray(rows[i][column]))
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    os.replace(temporary, output)
    counts["targets"] = len(keys)
    return counts


def _target_worker(shards: list[str], output_dir: str, target_adder, sd_model: str, batch_size: int,
                   threads: int | None) -> dict[str, int]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    add_targets = target_adder(sd_model, batch_size)
    total: dict[str, int] = {}
    for shard in shards:
        for name, value in _write_target_shard(shard, output_dir, add_targets).items():
            total[name] = total.get(name, 0) + value
    return total


def precompute_shard_targets(shards: str | os.PathLike | Sequence[str], output_dir: str | os.PathLike, sd_model: str,
                             target_adder, batch_size: int = 128, num_proc: int = 1) -> dict[str, int]:
    """Writes one target shard per input shard (see the module docstring). Under `accelerate launch`
    each process takes every `num_processes`-th shard; `num_proc` > 1 splits a process's shards
    again over that many local processes (each loads the text encoders once). `target_adder`:
    `gill_hf.data.generation_target_adder` or another module-level function of its signature (passed
    in, so that this module does not import `gill_hf.data`, which imports it). Returns the counts."""
    from accelerate import PartialState

    paths = list_shards(shards)
    os.makedirs(output_dir, exist_ok=True)
    state = PartialState()
    mine = paths[state.process_index::state.num_processes]
    if num_proc <= 1:
        return _target_worker(mine, os.fspath(output_dir), target_adder, sd_model, batch_size, None)
    threads = max(1, (os.cpu_count() or 1) // num_proc)
    parts = [(mine[i::num_proc], os.fspath(output_dir), target_adder, sd_model, batch_size, threads)
             for i in range(num_proc) if mine[i::num_proc]]
    with multiprocessing.get_context("spawn").Pool(len(parts)) as pool:
        results = pool.starmap(_target_worker, parts)
    return {name: sum(r.get(name, 0) for r in results) for name in set().union(*results)}


__all__ = ["BadShardError", "StreamStateCallback", "check_shards_for_processes", "iter_samples", "list_shards", "load_webdataset",
           "precompute_shard_targets"]
