"""benchmarks/reference_size.py, the reference-size script shared by the training and inference GPU
figures: its configuration is the reference's (the GILL heads' exact parameter count, built on the
meta device), and its CPU path runs end to end at tiny sizes with the decoding paths agreeing;
benchmarks/bench_decoding.py: every decoding path it times gives the pipeline's tokens.
Budget: about 5 s on 2 cores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from gill_hf import GillForConditionalGeneration

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_size.py"


def load_script():
    spec = importlib.util.spec_from_file_location("reference_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_builder_is_the_reference_configuration():
    script = load_script()
    with torch.device("meta"):
        model = GillForConditionalGeneration(script.gill_config(tiny=False))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 50_096_385  # the reference's GILL heads
    assert model.config.text_config.hidden_size == 4096 and model.config.vision_config.hidden_size == 1024
    assert model.config.num_clip_tokens == 77 and model.config.gen_emb_dim == script.SD15_UNET["cross_attention_dim"]


def test_the_cpu_path_runs_at_tiny_sizes(tmp_path):
    script = load_script()
    torch.set_num_threads(2)
    report = script.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--warmup", "2", "--train-steps", "2",
                          "--batch", "4", "--new-tokens", "8", "24", "--image-steps", "2", "--image-repeats", "1",
                          "--output", str(tmp_path / "report.json")])
    with torch.device("meta"):
        tiny = GillForConditionalGeneration(script.gill_config(tiny=True))
    assert report["gill_head_parameters"] == sum(p.numel() for p in tiny.parameters() if p.requires_grad)
    assert report["train"]["gill"]["steps_per_s"] > 0 and report["train"]["speed-up"] > 0
    for n in ("8", "24"):  # the KV-cached decoding and the reference's re-run loop pick the same tokens
        assert report["decode"][n]["tokens_identical"] is True
    assert report["image"]["no offload"]["s_per_image"] > 0 and report["image"]["model cpu offload"] == "needs a GPU"
    assert (tmp_path / "report.json").is_file()


def test_the_decoding_benchmark_paths_agree_with_the_pipeline_and_its_floor_reads_the_tied_head_once():
    import sys

    sys.path.insert(0, str(SCRIPT.parent))  # the benchmark scripts import each other, as when run from there
    try:
        spec = importlib.util.spec_from_file_location("bench_decoding", SCRIPT.parent / "bench_decoding.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    torch.set_num_threads(2)
    model, processor = bench.smollm2_gill(torch.float32)
    lm = model.language_model
    assert lm.get_input_embeddings().weight is lm.get_output_embeddings().weight  # tied: read once per token
    embedding = lm.get_input_embeddings().weight
    others = sum(p.numel() for name, p in lm.named_parameters(remove_duplicate=False) if p is not embedding)
    assert bench.weight_bytes(lm) == 4 * (others + embedding.numel())  # the tied matrix counted once, not twice
    ids = bench.prompt_ids(processor, bench.PROMPT_TOKENS)
    with torch.inference_mode():
        runs = {name: run(5) for name, run in bench.decoders(model, processor.tokenizer, ids, compile_step=False).items()}
    assert len(runs["gill_decode"]) == 5 and all(tokens == runs["gill_decode"] for tokens in runs.values()), runs
