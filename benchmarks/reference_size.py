"""The reference configuration at its real sizes, with random weights: OPT-6.7B + CLIP ViT-L/14 + GILL's
heads (50,096,385 parameters) and SD 1.5's UNet and VAE, built from configs written here on the meta
device and initialised on the target device (no hub). One script for the training and the inference
figures, each measured after warm-up in one run:

- `train`: GILL's training step (captioning pass + one fused text pass, vision once per step) against
  the reference's three-pass step, same batch: steps/s, their ratio, peak memory;
- `decode`: greedy decoding of 128 and 512 new tokens, KV-cached (the pipeline's) against the
  reference's loop (the whole sequence re-run at every step): tokens/s and whether the tokens agree;
- `image`: seconds per 512x512 image at 50 DDIM steps with guidance, from GILL's `prompt_embeds`
  through SD 1.5's UNet and VAE, with and without `enable_model_cpu_offload` (GPU only): peak memory.

`--tiny` shrinks every width and depth (a CPU check that runs in CI: tests/test_benchmarks.py).

    python benchmarks/reference_size.py --device cuda --dtype bfloat16 --output out/reference_size.json
    python benchmarks/reference_size.py --tiny --train-steps 3 --warmup 1 --new-tokens 8 16 --image-steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from gill_hf import GillConfig, GillForConditionalGeneration  # first: it quiets transformers' torchvision hints
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: I001
from transformers import CLIPVisionConfig, OPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import rerun_decode  # noqa: E402
from bench_training import make_batch, ours_step, reference_style_step  # noqa: E402

OPT_6_7B = dict(hidden_size=4096, word_embed_proj_dim=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=50272, max_position_embeddings=2048)
VIT_L_14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
TINY = {  # every width and depth scaled down, the structure kept
    "text": dict(hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                 max_position_embeddings=640),
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56),
    "unet": dict(SD15_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4,
                 layers_per_block=1, norm_num_groups=16),
    "vae": dict(SD15_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=64),
    "gill": dict(gen_emb_dim=32, ret_emb_dim=16, mapper_hidden_size=32, mapper_ffn_dim=64, mapper_num_encoder_layers=1,
                 mapper_num_decoder_layers=1),
}


def gill_config(tiny: bool) -> GillConfig:
    text = OPTConfig(**(TINY["text"] if tiny else OPT_6_7B), bos_token_id=2, eos_token_id=2, pad_token_id=1)
    vocab = text.vocab_size
    return GillConfig(text_config=text, vision_config=CLIPVisionConfig(**(TINY["vision"] if tiny else VIT_L_14)),
                      img_token_ids=list(range(vocab - 8, vocab)), image_token_id=vocab - 9, vocab_size=vocab,
                      **(TINY["gill"] if tiny else {}))


@torch.no_grad()
def materialise(module: torch.nn.Module, device, dtype=None) -> torch.nn.Module:
    """A module built on the meta device, allocated on `device` and filled with random values (norms at
    weight 1 / bias 0, as initialisation would: speed does not depend on the values)."""
    module = module.to_empty(device=device)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.endswith("position_ids"):  # CLIP's index buffer
            tensor.copy_(torch.arange(tensor.shape[-1], device=device).expand_as(tensor))
        elif not tensor.is_floating_point():
            raise ValueError(f"{name}: an integer buffer this builder does not know how to fill")
        elif "norm" in name or name.endswith(("ln.weight", "ln.bias")):
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            tensor.normal_(0, 0.02)
    if hasattr(module, "logit_scale"):
        module.logit_scale.fill_(2.6593)
    return module if dtype is None else module.to(dtype)


def build_gill(tiny: bool, device, dtype) -> GillForConditionalGeneration:
    with torch.device("meta"):
        model = GillForConditionalGeneration(gill_config(tiny))
    model = materialise(model, device)
    model.language_model.to(dtype)  # frozen backbones in the run's dtype; GILL's trainable heads stay fp32
    model.vision_model.to(dtype)
    return model


def peak_memory(device) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU, allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def seconds_per_call(fn, warmup: int, repeat: int, device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_train(model, args) -> dict:
    batch = {k: v.to(args.device) for k, v in make_batch(model.config, args.batch, torch.Generator().manual_seed(0)).items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.vision_model.dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    results = {}
    for name, step in (("gill", lambda: ours_step(model, batch)), ("reference three-pass", lambda: reference_style_step(model, batch))):
        def train_step(step=step):
            step().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        reset_peak(args.device)
        seconds = seconds_per_call(train_step, args.warmup, args.train_steps, args.device)
        results[name] = {"steps_per_s": 1 / seconds, "peak_memory": peak_memory(args.device)}
    results["speed-up"] = results["gill"]["steps_per_s"] / results["reference three-pass"]["steps_per_s"]
    return results


def bench_decode(model, args) -> dict:
    from bench_pipeline import GillDecodingOptions, GillTokenIds, gill_decode

    model.eval()
    config = model.config
    ids = torch.randint(10, config.vocab_size - 9, (1, 32), generator=torch.Generator().manual_seed(1)).to(args.device)
    masked = torch.zeros(model.logits_width, dtype=torch.bool, device=args.device)
    masked[[*config.img_token_ids, config.image_token_id]] = True
    masked[config.vocab_size:] = True
    token_ids = GillTokenIds(img_token_ids=list(config.img_token_ids), image_token_id=config.image_token_id,
                             vocab_size=config.vocab_size, eos_token_id=None, pad_token_id=1, newline_token_id=None)
    results = {}
    for n in args.new_tokens:
        options = GillDecodingOptions(max_new_tokens=n, min_word_tokens=n)
        cached = lambda: gill_decode(model, ids, torch.ones_like(ids), None, options, token_ids, [None])[0].token_ids  # noqa: E731
        t_cached = seconds_per_call(cached, 1, 1, args.device)
        t_rerun = seconds_per_call(lambda: rerun_decode(model, ids, n, masked), 0, 1, args.device)
        same = cached() == rerun_decode(model, ids, n, masked)[0]
        results[str(n)] = {"kv_cached_tok_per_s": n / t_cached, "rerun_tok_per_s": n / t_rerun, "speed-up": t_rerun / t_cached,
                           "tokens_identical": same}
    return results


def bench_image(args) -> dict:
    tiny = args.tiny
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(TINY["unet"] if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY["vae"] if tiny else SD15_VAE))
    pipe = StableDiffusionPipeline(vae=materialise(vae, args.device, args.dtype), unet=materialise(unet, args.device, args.dtype),
                                   scheduler=DDIMScheduler(), text_encoder=None, tokenizer=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    width = unet.config.cross_attention_dim
    embeds = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(2)).to(args.device, args.dtype)  # GILL's mapper output
    size = 8 * unet.config.sample_size

    def draw():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=args.image_steps,
                    guidance_scale=7.5, height=size, width=size, output_type="pt").images

    results = {}
    reset_peak(args.device)
    results["no offload"] = {"s_per_image": seconds_per_call(draw, 1, args.image_repeats, args.device), "peak_memory": peak_memory(args.device)}
    if torch.device(args.device).type == "cuda":
        pipe.to("cpu")
        pipe.enable_model_cpu_offload(device=args.device)
        reset_peak(args.device)
        results["model cpu offload"] = {"s_per_image": seconds_per_call(draw, 1, args.image_repeats, args.device),
                                        "peak_memory": peak_memory(args.device)}
    else:
        results["model cpu offload"] = "needs a GPU"
    return {"size": size, "steps": args.image_steps, **results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="every width and depth scaled down (a CPU check)")
    parser.add_argument("--parts", nargs="+", default=["train", "decode", "image"], choices=["train", "decode", "image"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--image-steps", type=int, default=50)
    parser.add_argument("--image-repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu",
              "dtype": str(args.dtype).replace("torch.", ""), "sizes": "tiny" if args.tiny else "reference (OPT-6.7B, ViT-L/14, SD 1.5)"}
    if {"train", "decode"} & set(args.parts):
        model = build_gill(args.tiny, args.device, args.dtype)
        report["gill_head_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if "train" in args.parts:
            report["train"] = {"batch": args.batch, "tokens": 32, **bench_train(model.train(), args)}
        if "decode" in args.parts:
            report["decode"] = bench_decode(model, args)
        del model
    if "image" in args.parts:
        report["image"] = bench_image(args)
    print(json.dumps(report, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
