"""`gill-hf train` end to end on a tiny CC3M-layout folder, LoRA training, and the command's wiring."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForCausalLM
from test_training import one_thread  # noqa: F401 (autouse: one torch thread)
from tiny_models import tiny_gill
from tiny_tokenizers import opt_like_tokenizer, tiny_image_processor

from gill_hf import GillProcessor
from gill_hf.cli import build_parser, main
from gill_hf import GillForConditionalGeneration
from gill_hf.modeling.lora_gill import apply_lora, load_lora
from gill_hf.training import LOSS_KEYS, GillTrainer, load_trainable_weights

SUBJECTS = ["A dog", "The cat", "A red car", "Two birds", "An old man", "The small house", "A girl", "My friend"]
PLACES = ["the park", "the beach"]


def tiny_checkpoint(folder, kind="opt"):
    """A full-form tiny GILL checkpoint plus its processor, as `--model_name_or_path` expects.

    At random init (std 0.02) the tiny vision tower's pooled output hardly depends on the image
    (across-image std 0.06); its encoder's matrices are scaled up 8x so that images are
    distinguishable (std 0.48) and retrieval has something to learn, as with a real CLIP."""
    model = tiny_gill(kind, seed=0)
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if name.startswith("encoder.") and param.ndim == 2:
                param.mul_(8)
    model.save_pretrained(folder)
    GillProcessor(image_processor=tiny_image_processor(), tokenizer=opt_like_tokenizer(folder / "tok")).save_pretrained(folder)
    return folder


def synthetic_cc3m(folder, n=16):
    """n captions with distinct random images and targets = a shared pattern + a small per-example part."""
    images = folder / "images"
    (images / "clip_embs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(6, 20)) * 2
    lines = ["caption\timage"]
    for i in range(n):
        name = f"{i:04d}.jpg"
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / name)
        np.save(images / "clip_embs" / f"{name}.npy", (pattern + 0.2 * rng.normal(size=(6, 20))).astype(np.float16))
        lines.append(f"{SUBJECTS[i % 8]} sits near {PLACES[i // 8]}.\t{name}")
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder / "train.tsv", images


def test_gill_hf_train_end_to_end_on_a_cc3m_folder(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "model")
    tsv, images = synthetic_cc3m(tmp_path / "data")
    out = tmp_path / "run"
    main([
        "train", "--model_name_or_path", str(checkpoint), "--train_tsv", str(tsv), "--image_dir", str(images),
        "--eval_tsv", str(tsv), "--max_length", "32", "--output_dir", str(out), "--use_cpu", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_steps", "60",
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--lr_step_size", "0", "--lr_scheduler_type", "constant",
        "--logging_steps", "5", "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "true",
    ])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h and "train_runtime" not in h]
    for key in LOSS_KEYS:
        assert all(key in h for h in train_logs), key
    assert train_logs[-1]["loss"] <= 0.7 * train_logs[0]["loss"], (train_logs[0]["loss"], train_logs[-1]["loss"])
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_t2i_r1"] >= 3 / 16, metrics  # 3x chance on the 16 training pairs
    files = {p.name for p in out.iterdir()}
    assert "gill_adapter.safetensors" in files and "model.safetensors" not in files


def test_lora_trains_only_lora_and_gill_weights_and_reloads(tmp_path):
    from tiny_models import training_batch

    model = tiny_gill("llama", seed=0)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = training_batch(batch=4, seed=1)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    stack = lambda r: {k: torch.stack([x[k] for x in r]) for k in r[0]}  # noqa: E731
    from gill_hf.training import GillTrainingArguments

    trainer = GillTrainer(model=model, train_dataset=rows, data_collator=stack, args=GillTrainingArguments(
        output_dir=str(tmp_path / "lora"), use_cpu=True, report_to="none", per_device_train_batch_size=4, max_steps=3,
        warmup_steps=0, lr_step_size=0, save_strategy="no", concat_captions_prob=0.0, learning_rate=1e-2))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    backbone_changed = {n for n in changed if n.startswith(("language_model.", "vision_model."))}
    assert backbone_changed and all(".lora_" in n for n in backbone_changed)
    assert "mapper.queries" in changed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or not n.startswith(("language_model.", "vision_model.")) for n in trainable)

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = tiny_gill("llama", seed=0)
    assert load_lora(reloaded, tmp_path / "saved")  # the LoRA layers (peft's format) ...
    load_trainable_weights(reloaded, tmp_path / "saved")  # ... and every trainable tensor
    model.eval()
    with torch.no_grad():
        a, b = model(**batch), reloaded(**batch)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.text_logits, b.text_logits)
    # `from_pretrained` of the adapter form brings the LoRA layers back by itself.
    base = tiny_gill("llama", seed=0)
    base.language_model.save_pretrained(tmp_path / "lm")
    base.vision_model.save_pretrained(tmp_path / "vision")
    loaded = GillForConditionalGeneration.from_pretrained(tmp_path / "saved", text_model=str(tmp_path / "lm"),
                                                          vision_model=str(tmp_path / "vision"))
    assert any(".lora_" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**batch).text_logits, a.text_logits)

    # peft reads the checkpoint's lora/ as its own: the base LM + that adapter is the GILL model's LM.
    from peft import PeftModel

    peft_lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "lm"), tmp_path / "saved" / "lora")
    ids = torch.randint(4, 300, (2, 9))
    with torch.no_grad():
        assert torch.allclose(peft_lm(input_ids=ids).logits, loaded.language_model(input_ids=ids).logits, atol=1e-6)

    # The LoRA layers travel through the head commands and an adapter-form save.
    loaded.config.backbone_references = {"text_model": {"path": str(tmp_path / "lm")}, "vision_model": {"path": str(tmp_path / "vision")}}
    loaded.save_pretrained(tmp_path / "adapter", form="adapter")
    tiny_processor_for(tmp_path).save_pretrained(tmp_path / "adapter")
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("text\tdecision\n" + "".join(f"{s} at {p}\t{'generate' if i % 2 else 'retrieve'}\n"
                                                   for i, (s, p) in enumerate((s, p) for s in SUBJECTS for p in PLACES)))
    main(["train-decision", "--model_name_or_path", str(tmp_path / "adapter"), "--prompts", str(prompts),
          "--output_dir", str(tmp_path / "decided"), "--steps", "3"])
    decided = GillForConditionalGeneration.from_pretrained(tmp_path / "decided")
    lora = {n: p for n, p in decided.named_parameters() if ".lora_" in n}
    assert lora and all(torch.equal(p, dict(loaded.named_parameters())[n]) for n, p in lora.items())
    with pytest.raises(ValueError, match="form='full'.*LoRA"):
        decided.save_pretrained(tmp_path / "full", form="full")

    # `gill-hf train` from a LoRA checkpoint trains its LoRA on; `--lora_r` would stack a fresh adapter over it.
    from gill_hf.train_recipe import GillModelArguments, _load_model_and_processor

    resumed, _ = _load_model_and_processor(GillModelArguments(model_name_or_path=str(tmp_path / "decided"),
                                                              backbone_dtype="float32"))
    lora_params = {n: p for n, p in resumed.named_parameters() if ".lora_" in n}
    assert lora_params.keys() == lora.keys() and all(p.requires_grad and torch.equal(p, lora[n]) for n, p in lora_params.items())
    with pytest.raises(ValueError, match="--lora_r.*already holds LoRA"):
        _load_model_and_processor(GillModelArguments(model_name_or_path=str(tmp_path / "decided"), lora_r=4))


def tiny_processor_for(tmp_path):
    return GillProcessor(image_processor=tiny_image_processor(), tokenizer=opt_like_tokenizer(tmp_path / "tok_lora"))


def test_parser_wiring_and_console_script():
    usage = build_parser().format_usage()
    assert "train" in usage and "train-decision" in usage
    with pytest.raises(SystemExit):
        main(["train-decision", "--model_name_or_path", "x", "--prompts", "y", "--output_dir", "z", "--bogus"])
    script = Path(sys.executable).parent / "gill-hf"  # the console script pyproject declares
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gill_hf.cli"]
    result = subprocess.run([*command, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--train_tsv", "--concat_captions_prob", "--weight_decay_mode", "--lora_r", "--gradient_accumulation_steps"):
        assert flag in result.stdout, flag


def test_every_flag_takes_both_spellings_and_help_shows_defaults():
    parser = build_parser()
    a = parser.parse_args(["train-decision", "--model-name-or-path", "m", "--prompts", "p", "--output-dir", "o", "--eval-fraction", "0.3"])
    b = parser.parse_args(["train-decision", "--model_name_or_path", "m", "--prompts", "p", "--output_dir", "o", "--eval_fraction", "0.3"])
    assert vars(a) == vars(b) and a.eval_fraction == 0.3
    c = parser.parse_args(["gill-tiny", "train", "--max_steps", "5", "--context_ratio", "0.5"])
    assert (c.max_steps, c.context_ratio) == (5, 0.5)
    help_text = subprocess.run([sys.executable, "-m", "gill_hf.cli", "train-decision", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "(default: 2000)" in " ".join(help_text.split())  # --steps


def test_top_level_help_imports_no_pipeline_data_or_training_stack():
    code = ("import sys, contextlib, io\nfrom gill_hf.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "heavy = [m for m in ('diffusers', 'datasets', 'transformers.trainer', 'gill_hf.training', 'gill_hf.pipelines')"
            " if m in sys.modules]\nprint(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
