"""Webdataset shards as img2dataset writes them: streamed through `datasets`, targets precomputed into
one shard per input shard (`gill-hf precompute-targets --webdataset`, resumable, `--num_proc`) and
joined by key; bad shards, missing images, undecodable bytes and keys without a target are skipped
and counted; two processes (and their DataLoader workers) read each shard exactly once per epoch.
Budget: about 5 s on an idle 2-core machine (one `--num_proc 2` run starts two processes).
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch
from test_data import CAPTIONS, processor, tiny_text_encoder
from test_training import one_thread  # noqa: F401 (autouse: one torch thread)
from tiny_tokenizers import opt_like_tokenizer

from gill_hf.data import GillDataCollator, encode_captions_for_sd
from gill_hf.shards import check_shards_for_processes, iter_samples, load_webdataset


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path, samples: list[dict[str, bytes | str]]) -> list[str]:
    """A tar in img2dataset's layout: per sample `{key}.jpg`, `{key}.txt`, `{key}.json`, consecutive.
    `samples`: {"key", and any of "jpg" (bytes), "txt" (str)}. Returns the keys."""
    with tarfile.open(path, "w") as archive:
        for sample in samples:
            key = sample["key"]
            files = {"txt": sample["txt"].encode()} if "txt" in sample else {}
            if "jpg" in sample:
                files["jpg"] = sample["jpg"]
            files["json"] = json.dumps({"key": key, "caption": sample.get("txt"), "status": "success"}).encode()
            for extension in ("jpg", "txt", "json"):
                if extension in files:
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(files[extension])
                    archive.addfile(info, io.BytesIO(files[extension]))
    return [s["key"] for s in samples]


def write_shards(folder, num_shards: int, per_shard: int, captions=CAPTIONS) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    keys = []
    for shard in range(num_shards):
        samples = [{"key": f"{shard:05d}{i:04d}", "txt": captions[(shard * per_shard + i) % len(captions)],
                    "jpg": jpeg_bytes(shard * 100 + i)} for i in range(per_shard)]
        keys += write_shard(os.path.join(folder, f"{shard:05d}.tar"), samples)
    return keys


def sd_folder(tmp_path):
    sd = tmp_path / "sd"
    tiny_text_encoder().save_pretrained(sd / "text_encoder")
    tokenizer = opt_like_tokenizer(tmp_path / "sdtok")
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(sd / "tokenizer")
    return sd, tokenizer


def test_target_shards_join_the_stream_by_key(tmp_path):
    from gill_hf.cli import main

    keys = write_shards(tmp_path / "shards", num_shards=2, per_shard=3)
    sd, tokenizer = sd_folder(tmp_path)
    main(["precompute-targets", "--webdataset", str(tmp_path / "shards"), "--sd_model", str(sd), "--batch_size", "2",
          "--output_dir", str(tmp_path / "targets")])
    assert sorted(os.listdir(tmp_path / "targets")) == ["00000.tar", "00001.tar"]  # one target shard per input shard
    stored = {k: v for shard in ("00000.tar", "00001.tar") for k, v in iter_samples(str(tmp_path / "targets" / shard))}
    assert sorted(stored) == keys and all(set(files) == {"gen_target.npy"} for files in stored.values())
    first = np.load(io.BytesIO(stored[keys[4]]["gen_target.npy"]))
    assert first.dtype == np.float16 and first.shape == (77, 20)
    with torch.no_grad():
        expected = encode_captions_for_sd(CAPTIONS[4], tiny_text_encoder(), tokenizer)[0].numpy().astype(np.float16)
    np.testing.assert_array_equal(first, expected)

    # A second run finds every shard done and rewrites nothing (an interrupted run resumes).
    stamps = {name: os.stat(tmp_path / "targets" / name).st_mtime_ns for name in os.listdir(tmp_path / "targets")}
    main(["precompute-targets", "--webdataset", str(tmp_path / "shards"), "--sd_model", str(sd),
          "--output_dir", str(tmp_path / "targets")])
    assert {name: os.stat(tmp_path / "targets" / name).st_mtime_ns for name in os.listdir(tmp_path / "targets")} == stamps
    # Two local processes write the same bytes.
    main(["precompute-targets", "--webdataset", str(tmp_path / "shards"), "--sd_model", str(sd), "--batch_size", "2",
          "--num_proc", "2", "--output_dir", str(tmp_path / "targets2")])
    for name in stamps:
        assert (tmp_path / "targets2" / name).read_bytes() == (tmp_path / "targets" / name).read_bytes()

    stream = load_webdataset(tmp_path / "shards", targets_dir=tmp_path / "targets")
    rows = list(stream)
    assert [r["__key__"] for r in rows] == keys and [r["caption"] for r in rows] == CAPTIONS
    batch = GillDataCollator(processor(tmp_path), max_length=16, num_clip_tokens=6)(rows)
    assert batch["pixel_values"].shape[0] == 6 and batch["gen_targets"].shape == (6, 6, 20)
    torch.testing.assert_close(batch["gen_targets"][4], torch.from_numpy(expected[:6].astype(np.float32)))


def test_bad_shards_missing_images_bad_bytes_and_missing_targets_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "shards"
    os.makedirs(folder)
    good = [{"key": f"00000{i:04d}", "txt": CAPTIONS[i], "jpg": jpeg_bytes(i)} for i in range(3)]
    write_shard(folder / "00000.tar", good + [{"key": "000000003", "txt": "No image here."},
                                              {"key": "000000004", "txt": "Broken bytes.", "jpg": b"not a jpeg at all"}])
    write_shard(folder / "00001.tar", [{"key": f"00001{i:04d}", "txt": CAPTIONS[i], "jpg": jpeg_bytes(10 + i)} for i in range(4)])
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[: int(len(data) * 0.6)])  # truncated mid-shard
    targets = tmp_path / "targets"
    os.makedirs(targets)
    target = io.BytesIO()
    np.save(target, np.ones((77, 20), dtype=np.float16))
    # every key of the first shard but 000000001 has a target; the truncated shard's have theirs
    write_shard_targets = [(k, target.getvalue()) for k in ("000000000", "000000002", "000000003", "000000004")]
    for shard, entries in (("00000.tar", write_shard_targets), ("00001.tar", [(f"00001{i:04d}", target.getvalue()) for i in range(4)])):
        with tarfile.open(targets / shard, "w") as archive:
            for key, value in entries:
                info = tarfile.TarInfo(f"{key}.gen_target.npy")
                info.size = len(value)
                archive.addfile(info, io.BytesIO(value))

    rows = list(load_webdataset(folder, targets_dir=targets))  # the stream itself never raises
    complete = [r["__key__"] for r in rows if r["__url__"].endswith("00001.tar") and r["__key__"]]
    assert 0 < len(complete) < 4  # the samples before the break, then one marker row
    collator = GillDataCollator(processor(tmp_path), max_length=16, num_clip_tokens=6)
    batch = collator(rows)
    assert collator.skipped == {"missing_target": 1, "bad_image": 2, "bad_shard": 1}
    assert batch["gen_targets"].shape[0] == 2 + len(complete)


def test_two_processes_and_their_workers_read_each_shard_once_per_epoch(tmp_path):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    keys = write_shards(tmp_path / "shards", num_shards=4, per_shard=3)
    stream = load_webdataset(tmp_path / "shards")
    for workers in (0, 2):
        read = []
        for rank in (0, 1):
            loader = DataLoader(stream, batch_size=2, num_workers=workers, collate_fn=lambda rows: [r["__key__"] for r in rows])
            loader = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False, dispatch_batches=False)
            mine = [key for batch in loader for key in batch]
            assert len(mine) == 6 and len({k[:5] for k in mine}) == 2  # two whole shards each
            read += mine
        assert sorted(read) == keys  # every key once, no rank reading another's shards
    check_shards_for_processes(stream, 2)
    with pytest.raises(ValueError, match="4 shards cannot be split evenly over 3 processes"):
        check_shards_for_processes(stream, 3)
