"""`accelerate launch` of the unchanged `gill-hf train` on 2 CPU processes (gloo): with
`--contrastive_gather autograd`, augmentation off and captions of equal token counts, its losses and
final GILL tensors equal a single-process run on the same global batch; a 2-process run stopped after
a checkpoint, or killed (SIGKILL) while training on past it, and resumed ends where the uninterrupted one
does; the same for webdataset shards streamed per process, and for FSDP2 on CPU. The shipped accelerate
configs parse.
Budget: about 75 s on an idle 2-core machine (twelve short training launches, streaming and FSDP2 included).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from test_pipeline import tiny_processor
from tiny_models import tiny_gill

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
CANDIDATES = [f"{s} {v} {o}." for s in ("A dog", "The cat", "A girl", "My friend", "Two birds", "A red car")
              for v in ("sits on", "looks at", "runs across") for o in ("the park", "the beach", "a green field")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    processor = tiny_processor(root)
    ids = dict(img_token_ids=processor.img_token_ids, image_token_id=processor.image_token_id, vocab_size=len(processor.tokenizer))
    model = tiny_gill("opt", seed=3, **ids)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    # Equal token counts, so that the processes' mean losses average to the global mean.
    by_length: dict[int, list[str]] = {}
    for caption in CANDIDATES:
        by_length.setdefault(len(processor.tokenizer(caption)["input_ids"]), []).append(caption)
    captions = max(by_length.values(), key=len)[:8]
    assert len(captions) == 8
    rng = np.random.default_rng(0)
    features = datasets.Features({"caption": datasets.Value("string"), "image": datasets.Image(),
                                  "gen_targets": datasets.Array2D((6, 20), "float32")})
    rows = {"caption": captions, "image": [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in captions],
            "gen_targets": [rng.standard_normal((6, 20)).astype(np.float32) for _ in captions]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "data"))
    return root


def train_command(root: Path, output: str, processes: int, max_steps: int, *extra: str, data: list[str] | None = None,
                  global_batch: int = 8, launcher: list[str] | None = None) -> tuple[list[str], dict]:
    """(argv, environment) of one `gill-hf train` run, through `accelerate launch` when `processes` > 1
    (DDP over gloo unless `launcher` gives other launch arguments). By default on the saved dataset with
    global batch 8 = the whole dataset, so the split between processes does not matter."""
    data = data or ["--dataset_name", str(root / "data")]
    command = ["-m", "gill_hf.cli", "train", "--model_name_or_path", str(root / "model"), *data, "--output_dir", str(root / output),
               "--per_device_train_batch_size", str(global_batch // processes), "--max_steps", str(max_steps),
               "--learning_rate", "1e-2", "--warmup_steps", "0", "--lr_step_size", "0", "--lr_scheduler_type", "constant",
               "--concat_captions_prob", "0", "--contrastive_gather", "autograd", "--logging_steps", "1", "--save_steps", "2",
               "--report_to", "none", "--seed", "0", "--use_cpu", "true", "--dataloader_num_workers", "0",
               # Attention's key bias has a zero gradient in exact arithmetic (softmax ignores a constant
               # shift); AdamW turns its rounding noise (~1e-10, different in a different batch split) into
               # steps of ~lr x noise / (noise + eps). A larger eps keeps those under the tolerance.
               "--adam_epsilon", "1e-6", *extra]
    if processes > 1:  # accelerate's torchrun launcher; `--use_cpu true` makes the processes join over gloo
        # (its `--cpu` launcher starts one process unless MPI is installed)
        launcher = launcher or ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision",
                                "no", "--dynamo_backend", "no"]
        # a free rendezvous port each launch: the default 29500 can still be held by the previous launch's socket
        command = ["-m", "accelerate.commands.launch", *launcher, "--main_process_port", str(free_port()), *command]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return [sys.executable, *command], env


def train(root: Path, output: str, processes: int, max_steps: int, *extra: str, **options) -> dict:
    """Runs `train_command` to its end; its logs and final GILL tensors."""
    argv, env = train_command(root, output, processes, max_steps, *extra, **options)
    result = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((root / output / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    return {"logs": [e for e in state["log_history"] if "loss" in e and "train_runtime" not in e],
            "weights": load_file(str(root / output / "gill_adapter.safetensors"))}


def train_until_killed(root: Path, output: str, processes: int, checkpoint: int, **options) -> None:
    """A run that cannot finish (200 steps), killed with SIGKILL (launcher and workers) as soon as
    its `checkpoint` holds every process's stream state, i.e. while it trains on past it."""
    argv, env = train_command(root, output, processes, 200, **options)
    done = [root / output / f"checkpoint-{checkpoint}" / f"stream_state-{rank}.json" for rank in range(processes)]
    process = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not all(path.is_file() for path in done):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL  # killed, not finished


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_run(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert [e["step"] for e in a["logs"]] == [e["step"] for e in b["logs"]]
    for x, y in zip(a["logs"], b["logs"]):
        for key in ("loss", "caption_loss", "text_loss", "contrastive_loss", "gen_loss"):
            assert x[key] == pytest.approx(y[key], abs=tolerance), (x["step"], key)
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], atol=tolerance, rtol=0, msg=name)


@pytest.fixture(scope="module")
def single(setup):
    run = train(setup, "single", 1, 4)
    assert run["logs"][0]["loss"] != run["logs"][-1]["loss"]  # it trained
    return run


def test_two_processes_equal_one_process_on_the_global_batch(setup, single):
    assert_same_run(train(setup, "double", 2, 4), single)


def test_fsdp2_runs_on_cpu_and_equals_one_process_with_activation_checkpointing_too(setup, single):
    # The shipped FSDP2 config, on 2 CPU processes (torch's fully_shard works over gloo here), in fp32.
    config = (CONFIGS / "fsdp2.yaml").read_text().replace("use_cpu: false", "use_cpu: true")
    config = config.replace("mixed_precision: bf16", 'mixed_precision: "no"').replace("num_processes: 8", "num_processes: 2")
    (setup / "fsdp2_cpu.yaml").write_text(config)
    launcher = ["--config_file", str(setup / "fsdp2_cpu.yaml")]
    assert_same_run(train(setup, "fsdp2", 2, 4, launcher=launcher), single)
    assert_same_run(train(setup, "fsdp2_gc", 2, 4, "--activation_checkpointing", "true", launcher=launcher), single)


def test_a_stopped_two_process_run_resumes_to_the_same_end(setup):
    uninterrupted = train(setup, "whole", 2, 4)
    train(setup, "pieces", 2, 2)  # stopped after its checkpoint at step 2 (a constant LR: same schedule so far)
    resumed = train(setup, "pieces", 2, 4, "--resume_from_checkpoint", str(setup / "pieces" / "checkpoint-2"))
    assert_same_run(resumed, uninterrupted, tolerance=1e-6)


def webdataset(root: Path, name: str, shards: list[list[int]]) -> list[str]:
    """Shards of the setup's captions, images and targets (sample i of the setup's 8, cycled),
    `shards[j]` listing the samples of shard j; with their target shards under `<name>_targets`."""
    from test_shards import jpeg_bytes, write_shard

    saved = datasets.load_from_disk(str(root / "data"))
    folder, targets = root / name, root / f"{name}_targets"
    folder.mkdir(), targets.mkdir()
    for j, samples in enumerate(shards):
        rows = [{"key": f"{j:05d}{n:04d}", "txt": saved[i % 8]["caption"], "jpg": jpeg_bytes(i)} for n, i in enumerate(samples)]
        write_shard(folder / f"{j:05d}.tar", rows)
        with tarfile.open(targets / f"{j:05d}.tar", "w") as archive:
            for row, i in zip(rows, samples):
                buffer = io.BytesIO()
                np.save(buffer, np.asarray(saved[i % 8]["gen_targets"], dtype=np.float32) * (1 + i // 8))
                info = tarfile.TarInfo(f"{row['key']}.gen_target.npy")
                info.size = buffer.tell()
                archive.addfile(info, io.BytesIO(buffer.getvalue()))
    return ["--webdataset", str(folder), "--targets_dir", str(targets)]


def test_two_processes_streaming_their_own_shards_equal_one_process_on_the_global_batches(setup):
    # 2 processes, 2 rows each a step: rank 0 streams shard 0, rank 1 shard 1 (accelerate splits by shard),
    # so global step k holds rows 2k, 2k+1 of shard 0 then of shard 1; one process streaming a shard in
    # that order at batch 4 sees the same global batches.
    shard0, shard1 = list(range(0, 6)), list(range(6, 12))
    two = webdataset(setup, "wds_two", [shard0, shard1])
    one = webdataset(setup, "wds_one", [[r for k in range(3) for r in shard0[2 * k:2 * k + 2] + shard1[2 * k:2 * k + 2]]])
    single = train(setup, "wds_single", 1, 3, data=one, global_batch=4)
    double = train(setup, "wds_double", 2, 3, data=two, global_batch=4)
    assert_same_run(double, single)


def test_a_killed_streaming_run_resumes_from_the_stream_state_without_reading_consumed_shards(setup):
    # 4 shards of 6 rows: each process streams 2 shards, 3 steps a shard. Killed (SIGKILL) while training
    # on past its step-4 checkpoint (mid-way through each process's second shard) and resumed from it with
    # the consumed shards overwritten by junk: a resume that re-read the stream would hit them (a skipped
    # "bad shard", other batches).
    shards = [list(range(6 * j, 6 * j + 6)) for j in range(4)]
    uninterrupted = train(setup, "wds_whole", 2, 6, data=webdataset(setup, "wds_a", shards), global_batch=4)
    data = webdataset(setup, "wds_b", shards)
    train_until_killed(setup, "wds_pieces", 2, 4, data=data, global_batch=4)
    states = [json.loads((setup / "wds_pieces" / "checkpoint-4" / f"stream_state-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(s["examples_iterable"]["shard_idx"] == 1 for s in states)  # each process is in its second shard
    for consumed in ("00000.tar", "00002.tar"):
        (setup / "wds_b" / consumed).write_bytes(b"junk" * 100)
    resumed = train(setup, "wds_pieces", 2, 6, "--resume_from_checkpoint", str(setup / "wds_pieces" / "checkpoint-4"),
                    data=data, global_batch=4)  # (the constant LR makes the killed run's 200-step schedule the same)
    assert "skipped_examples" not in resumed["logs"][-1]
    assert_same_run(resumed, uninterrupted, tolerance=1e-6)


def test_streaming_needs_max_steps_and_target_shards(setup):
    from gill_hf.train_recipe import train_from_argv

    data = webdataset(setup, "wds_checks", [[0, 1], [2, 3]])
    base = ["--model_name_or_path", str(setup / "model"), "--output_dir", str(setup / "checks"), "--use_cpu", "true"]
    with pytest.raises(ValueError, match="--max_steps"):
        train_from_argv([*base, *data])
    with pytest.raises(ValueError, match="precompute-targets --webdataset"):
        train_from_argv([*base, *data[:2], "--sd_model", "x", "--max_steps", "1"])


@pytest.mark.parametrize("name, engine", [("ddp_bf16", "MULTI_GPU"), ("fsdp2", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.name == engine and config.mixed_precision == "bf16" and config.num_processes == 8
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
