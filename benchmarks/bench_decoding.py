"""CPU decoding of the embedded LLM (SmolLM2-135M) against the machine's memory-bandwidth floor,
one option at a time, and where the time goes.

Floor = read bandwidth (a 1 GB fp32 `tensor.sum()`, same run, same threads) / weight bytes read per
token in the dtype used (every LM tensor once: the tied embedding is read whole as the output head).
Each row: greedy, batch 1, a 64-token prompt, `--new-tokens` new tokens with no early stop; median of
`--repeat` runs after a warm-up; tokens/s = new tokens / the whole call (prefill included), % of floor,
first-token latency (the time of a 1-token run: the prefill plus one token), and whether the tokens
equal the first row's (the pipeline's path today).

Rows:
  gill_decode          the pipeline's decoding (transformers `generate` + GILL's logits processors)
  generate             the bare LM's `generate` (DynamicCache)
  generate, static     `generate(cache_implementation="static")`
  loop, dynamic        a hand-written greedy loop over the LM's forward with a DynamicCache: no
                       processors, no stopping criteria (what `generate` adds on top of the LM)
  loop, static         the same loop with a StaticCache
  loop, static, compiled   the same with `torch.compile` of the forward (opt-in; `--compile`); its
                       one-off compile time is reported as warm-up
  bf16 rows            the same LM in bf16, against its own floor (half the bytes)

Then (`--profile`) a profile of cached loop steps (torch.profiler, operators by self CPU time) and
(`--kernels`) the LM's matmuls alone in three weight layouts.

    python benchmarks/bench_decoding.py --threads 2                      # idle machine
    python benchmarks/bench_decoding.py --threads 2 --compile --bf16 --profile --kernels
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from bench_pipeline import prompt_ids, read_bandwidth, smollm2_gill, timed, weight_bytes

PROMPT_TOKENS = 64


def decoders(model, tokenizer, ids: torch.Tensor, compile_step: bool) -> dict:
    """name -> fn(n) returning the n new token ids, for GILL `model` (random heads on the LM) and its LM."""
    from transformers import DynamicCache, StaticCache

    from gill_hf.pipelines.decoding_gill import GillDecodingOptions, GillTokenIds, gill_decode

    lm, mask = model.language_model, torch.ones_like(ids)

    def loop(cache_factory, forward):
        def run(n):
            cache = cache_factory(n)
            token = forward(ids, cache, torch.arange(ids.shape[1]))[:, -1].argmax(-1, keepdim=True)
            tokens = [token]
            for step in range(n - 1):
                token = forward(token, cache, torch.tensor([ids.shape[1] + step]))[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            return torch.cat(tokens, dim=1)[0].tolist()  # one host sync, at the end

        return run

    def plain_forward(input_ids, cache, position):
        return lm(input_ids=input_ids, past_key_values=cache, cache_position=position, use_cache=True).logits

    def static(n):
        return StaticCache(config=lm.config, max_cache_len=ids.shape[1] + n)

    def generate(**extra):
        def run(n):
            out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id, **extra)
            return out[0, ids.shape[1]:].tolist()

        return run

    token_ids = GillTokenIds(img_token_ids=list(model.config.img_token_ids), image_token_id=model.config.image_token_id,
                             vocab_size=model.config.vocab_size, eos_token_id=None, pad_token_id=tokenizer.eos_token_id,
                             newline_token_id=None)

    def pipeline(n):
        # text only and no stop, as the other rows: [IMG0] masked for all n tokens
        options = GillDecodingOptions(max_new_tokens=n, min_word_tokens=n)
        return gill_decode(model, ids, mask, None, options, token_ids, [None])[0].token_ids

    rows = {"gill_decode": pipeline, "generate": generate(), "generate, static": generate(cache_implementation="static"),
            "loop, dynamic": loop(lambda n: DynamicCache(config=lm.config), plain_forward), "loop, static": loop(static, plain_forward)}
    if compile_step:
        rows["loop, static, compiled"] = loop(static, torch.compile(plain_forward, dynamic=False))
    return rows


def bench(dtype: torch.dtype, args, bandwidth: float) -> None:
    model, processor = smollm2_gill(dtype)
    lm, ids = model.language_model, prompt_ids(processor, PROMPT_TOKENS)
    floor = bandwidth / weight_bytes(lm)
    print(f"\n## SmolLM2-135M {str(dtype).replace('torch.', '')}: weights {weight_bytes(lm) / 2**20:.1f} MiB read per token, "
          f"floor {floor:.1f} tokens/s")
    print(f"{'path':<24} | {'tok/s':>6} | {'% floor':>7} | {'first token s':>13} | {'warm-up s':>9} | tokens")
    reference = None
    with torch.inference_mode():
        for name, run in decoders(model, processor.tokenizer, ids, args.compile).items():
            start = time.perf_counter()
            run(args.new_tokens), run(1)  # warm-up at the timed lengths (a static cache's size is part of a compiled graph)
            warm_up = time.perf_counter() - start
            seconds, tokens = timed(lambda: run(args.new_tokens), args.repeat)
            first, _ = timed(lambda: run(1), args.repeat)
            reference = reference or tokens
            verdict = "= gill_decode" if tokens == reference else f"differ from step {next(i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b)}"
            rate = args.new_tokens / seconds
            print(f"{name:<24} | {rate:>6.1f} | {rate / floor:>6.1%} | {first:>13.3f} | {warm_up:>9.1f} | {verdict}",
                  flush=True)
    if args.profile:
        profile_step(lm, ids)


def profile_step(lm, ids: torch.Tensor, steps: int = 8) -> None:
    """Operators by self CPU time over `steps` cached single-token steps."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    lm(input_ids=ids, past_key_values=cache, use_cache=True)
    token = torch.tensor([[lm.config.bos_token_id or 1]])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            lm(input_ids=token, past_key_values=cache, use_cache=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    print(f"\nprofile of {steps} cached steps (loop, dynamic):\n{table}")


def kernel_bandwidth(lm, repeat: int) -> None:
    """The LM's matmuls alone, at batch 1, on copies of its weight shapes (so nothing stays in cache
    between layers): `F.linear` as the LM calls it, against the same products with the weights stored
    transposed and with oneDNN-packed weights (both change the summation order, so not bit-identical)."""
    import torch.nn.functional as F
    import torch.utils.mkldnn

    shapes = [tuple(m.weight.shape) for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    weights = [torch.randn(shape, dtype=torch.float32) for shape in shapes]
    inputs = {k: torch.randn(1, k) for k in {shape[1] for shape in shapes}}
    transposed = [w.t().contiguous() for w in weights]
    packed = []
    for w in weights:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w
        packed.append(torch.utils.mkldnn.to_mkldnn(linear))
    total = sum(w.numel() * w.element_size() for w in weights)
    variants = {"F.linear (the LM's call)": lambda: [F.linear(inputs[w.shape[1]], w) for w in weights],
                "weights stored transposed": lambda: [inputs[w.shape[0]] @ w for w in transposed],
                "oneDNN-packed weights": lambda: [m(inputs[m.weight.shape[1]]) for m in packed]}
    print(f"\nthe LM's {len(weights)} matmuls per token (fp32, {total / 2**20:.0f} MiB, distinct weights):")
    with torch.inference_mode():
        for name, run in variants.items():
            run()
            seconds, _ = timed(run, repeat)
            print(f"{name:<26} {seconds * 1e3:6.1f} ms/token, {total / seconds / 1e9:5.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd step (slow warm-up)")
    parser.add_argument("--bf16", action="store_true", help="also the bf16 LM, against its own floor")
    parser.add_argument("--profile", action="store_true", help="profile one cached step per dtype")
    parser.add_argument("--kernels", action="store_true", help="the LM's matmuls alone, three weight layouts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth(args.repeat)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"config: threads={args.threads}, batch=1, greedy, prompt={PROMPT_TOKENS} tokens, new={args.new_tokens}, "
          f"median of {args.repeat} after warm-up, read bandwidth {bandwidth / 1e9:.2f} GB/s (1 GB sum), "
          f"load average at start {load:.2f}, cpu={platform.processor() or platform.machine()}, torch {torch.__version__}")
    for dtype in [torch.float32] + ([torch.bfloat16] if args.bf16 else []):
        bench(dtype, args, bandwidth)
    if args.kernels:
        kernel_bandwidth(smollm2_gill(torch.float32)[0].language_model, args.repeat)


if __name__ == "__main__":
    main()
