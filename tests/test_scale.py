"""`accelerate launch` of the unchanged `gill-hf train` on 2 CPU processes (gloo): with
`--contrastive_gather autograd`, augmentation off and captions of equal token counts, its losses and
final GILL tensors equal a single-process run on the same global batch; a 2-process run stopped after
a checkpoint and resumed ends where the uninterrupted one does. The shipped accelerate configs parse.
Budget: about 75 s on 2 cores (five short training processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def train(root: Path, output: str, processes: int, max_steps: int, *extra: str) -> dict:
    """One `gill-hf train` run (global batch 8 = the whole dataset, so the split between processes does
    not matter), through `accelerate launch` when `processes` > 1."""
    command = ["-m", "gill_hf.cli", "train", "--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "data"),
               "--output_dir", str(root / output), "--per_device_train_batch_size", str(8 // processes), "--max_steps", str(max_steps),
               "--learning_rate", "1e-2", "--warmup_steps", "0", "--lr_step_size", "0", "--lr_scheduler_type", "constant",
               "--concat_captions_prob", "0", "--contrastive_gather", "autograd", "--logging_steps", "1", "--save_steps", "2",
               "--report_to", "none", "--seed", "0", "--use_cpu", "true", "--dataloader_num_workers", "0",
               # Attention's key bias has a zero gradient in exact arithmetic (softmax ignores a constant
               # shift); AdamW turns its rounding noise (~1e-10, different in a different batch split) into
               # steps of ~lr x noise / (noise + eps). A larger eps keeps those under the tolerance.
               "--adam_epsilon", "1e-6", *extra]
    if processes > 1:  # accelerate's torchrun launcher; `--use_cpu true` makes the processes join over gloo
        # (its `--cpu` launcher starts one process unless MPI is installed)
        command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", *command]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, *command], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((root / output / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    return {"logs": [e for e in state["log_history"] if "loss" in e and "train_runtime" not in e],
            "weights": load_file(str(root / output / "gill_adapter.safetensors"))}


def assert_same_run(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert [e["step"] for e in a["logs"]] == [e["step"] for e in b["logs"]]
    for x, y in zip(a["logs"], b["logs"]):
        for key in ("loss", "caption_loss", "text_loss", "contrastive_loss", "gen_loss"):
            assert x[key] == pytest.approx(y[key], abs=tolerance), (x["step"], key)
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], atol=tolerance, rtol=0, msg=name)


def test_two_processes_equal_one_process_on_the_global_batch(setup):
    single = train(setup, "single", 1, 4)
    double = train(setup, "double", 2, 4)
    assert single["logs"][0]["loss"] != single["logs"][-1]["loss"]  # it trained
    assert_same_run(double, single)


def test_a_stopped_two_process_run_resumes_to_the_same_end(setup):
    uninterrupted = train(setup, "whole", 2, 4)
    train(setup, "pieces", 2, 2)  # stopped after its checkpoint at step 2 (a constant LR: same schedule so far)
    resumed = train(setup, "pieces", 2, 4, "--resume_from_checkpoint", str(setup / "pieces" / "checkpoint-2"))
    assert_same_run(resumed, uninterrupted, tolerance=1e-6)


@pytest.mark.parametrize("name, engine", [("ddp_bf16", "MULTI_GPU"), ("fsdp2", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.name == engine and config.mixed_precision == "bf16" and config.num_processes == 8
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
