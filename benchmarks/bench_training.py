"""Training throughput: the reference's step against ours, one process, same model and batch.

- reference-style: three passes per step as the reference's training loop runs them (captioning,
  retrieval, generation), each recomputing the frozen vision features (under no_grad) and running
  the LM with gradients;
- ours, vision per step: the model's training forward (captioning pass + one fused text pass
  serving retrieval and generation), vision features computed once per step;
- ours, cached vision: the same with vision features precomputed once (`cache_image_features`).

Backbones are random-initialised at the sizes named (speed does not depend on the weights).
Configurations:
- `world`: the embedded world's sizes (SmolLM2-135M LM, the world's 32x32 CLIP vision tower);
- `paper-ratio`: a small LM and a ViT at 224 px whose forward-cost ratio is near OPT-6.7B vs
  CLIP ViT-L/14 on 32-token captions (vision ~ 0.37 x LM per example), with a mapper shrunk to a
  small share of the LM's cost as at paper scale.

    python benchmarks/bench_training.py [--configs world paper-ratio] [--batch 4] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from gill_hf import GillConfig, GillForConditionalGeneration
from gill_hf.modeling.training_passes import causal_lm_loss

LENGTH = 32  # reference max_len


def configs() -> dict[str, GillConfig]:
    def gill(text, vision, vocab, **mapper):
        ids = list(range(vocab - 8, vocab))
        return GillConfig(text_config=text, vision_config=vision, img_token_ids=ids, image_token_id=vocab - 9,
                          vocab_size=vocab, gen_emb_dim=128, num_clip_tokens=77, **mapper)

    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
    world_clip = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=128, intermediate_size=512,
                                  num_hidden_layers=4, num_attention_heads=4)
    small_lm = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True)
    vit = CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024,
                           num_hidden_layers=2, num_attention_heads=4)
    # At paper scale the mapper (25M parameters) is ~0.4% of OPT-6.7B; beside this small LM the
    # reference-size mapper would cost as much as the LM, so it is shrunk to keep the paper's shares.
    small_mapper = dict(mapper_hidden_size=64, mapper_ffn_dim=256)
    return {"world": gill(smollm2, world_clip, 49152), "paper-ratio": gill(small_lm, vit, 8192, **small_mapper)}


def make_batch(config: GillConfig, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    rows = []
    for i in range(batch):
        n = 8 + (5 * i) % (LENGTH - 8 - 9)
        caption = torch.randint(10, config.vocab_size - 9, (n,), generator=generator).tolist()
        row = [1] + caption + list(config.img_token_ids)
        rows.append(row + [0] * (LENGTH - len(row)))
    size = config.vision_config.image_size
    return {
        "input_ids": torch.tensor(rows),
        "pixel_values": torch.rand(batch, 3, size, size, generator=generator),
        "gen_targets": torch.randn(batch, config.num_clip_tokens, config.gen_emb_dim, generator=generator),
    }


def reference_style_step(model: GillForConditionalGeneration, batch: dict) -> torch.Tensor:
    """Three passes, vision recomputed in each, as the reference's loop (losses as the reference's)."""
    ids, pixels, targets = batch["input_ids"], batch["pixel_values"], batch["gen_targets"]
    starts = [row.index(model.config.img_token_ids[0]) for row in ids.tolist()]
    tokens = model.embed_tokens(ids)
    loss = 0.0
    # 1. captioning: visual prefix + caption.
    with torch.no_grad():
        features = model.get_image_features(pixels).pooler_output
    prefix = model.get_visual_prefix(image_features=features)
    out = model.language_model(inputs_embeds=torch.cat([prefix, tokens], 1), output_hidden_states=True)
    labels = torch.cat([torch.full(prefix.shape[:2], -100), ids], 1)
    loss = loss + causal_lm_loss(model.compute_logits(out.hidden_states[-1], out.logits), labels)
    # 2. retrieval and 3. generation: each its own vision pass and LM pass over caption + [IMG].
    for mode in ("retrieval", "generation"):
        with torch.no_grad():
            features = model.get_image_features(pixels).pooler_output
        out = model.language_model(inputs_embeds=tokens, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        loss = loss + 0.5 * causal_lm_loss(model.compute_logits(hidden, out.logits), ids)
        block = torch.stack([hidden[i, s : s + model.config.num_img_tokens] for i, s in enumerate(starts)])
        if mode == "retrieval":
            text = model.get_text_retrieval_embeds(block)
            image = model.get_image_retrieval_embeds(image_features=features)
            logits = model.logit_scale.exp() * image @ text.T
            arange = torch.arange(len(ids))
            loss = loss + (torch.nn.functional.cross_entropy(logits, arange) + torch.nn.functional.cross_entropy(logits.T, arange)) / 2
        else:
            prompt = model.get_prompt_embeds(block)
            loss = loss + (prompt - targets).pow(2).sum(-1).sqrt().mean()
    return loss


def ours_step(model, batch, cached_features=None) -> torch.Tensor:
    if cached_features is None:
        with torch.no_grad():
            features = model.get_image_features(batch["pixel_values"]).pooler_output
    else:
        features = cached_features
    return model(input_ids=batch["input_ids"], image_features=features, gen_targets=batch["gen_targets"]).loss


def time_interleaved(steps: dict, optimizer, repeats: int) -> dict[str, float]:
    """Median seconds per optimizer step of each variant, the variants taking turns step by step
    so that a machine shared with other jobs slows them alike. The first round is warm-up."""
    times = {name: [] for name in steps}
    for _ in range(repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step().backward()
            optimizer.step()
            optimizer.zero_grad()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def lm_vision_ratio(model, batch) -> float:
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            model.language_model(inputs_embeds=model.embed_tokens(batch["input_ids"]))
            t1 = time.perf_counter()
            model.get_image_features(batch["pixel_values"]).pooler_output
            t2 = time.perf_counter()
    return (t2 - t1) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["world", "paper-ratio"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={args.threads} batch={args.batch} length={LENGTH} fp32; median of {args.steps} interleaved steps after 1 warm-up round")
    print("| config | LM | vision | mapper/LM params | vision/LM fwd cost | reference-style samples/s | ours (vision per step) | ours (cached vision) | speed-up (cached) |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_configs = configs()
    for name in args.configs:
        config = all_configs[name]
        torch.manual_seed(0)
        model = GillForConditionalGeneration(config).to(args.device).train()
        generator = torch.Generator().manual_seed(0)
        batch = {k: v.to(args.device) for k, v in make_batch(config, args.batch, generator).items()}
        with torch.no_grad():
            cached = model.get_image_features(batch["pixel_values"]).pooler_output
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ratio = lm_vision_ratio(model, batch)
        timed = time_interleaved({
            "reference": lambda: reference_style_step(model, batch),
            "per_step": lambda: ours_step(model, batch),
            "cached": lambda: ours_step(model, batch, cached),
        }, optimizer, args.steps)
        reference, per_step, cached_time = timed["reference"], timed["per_step"], timed["cached"]
        lm = f"{config.text_config.num_hidden_layers}x{config.text_config.hidden_size}"
        vision = f"{config.vision_config.num_hidden_layers}x{config.vision_config.hidden_size}@{config.vision_config.image_size}px"
        share = sum(p.numel() for p in model.mapper.parameters()) / sum(p.numel() for p in model.language_model.parameters())
        print(f"| {name} | {lm} | {vision} | {share:.3f} | {ratio:.2f} | {args.batch / reference:.2f} | {args.batch / per_step:.2f} | "
              f"{args.batch / cached_time:.2f} | {reference / cached_time:.2f}x |")


if __name__ == "__main__":
    main()
