"""CPU decoding of the embedded LLM (SmolLM2-135M) against the machine's memory-bandwidth floor,
one option at a time, and where the time goes.

Floor = read bandwidth (a 1 GB fp32 `tensor.sum()`, same run, same threads) / weight bytes read per
token in the dtype used (every LM tensor once: the tied embedding is read whole as the output head).
Each row: greedy, batch 1, a 64-token prompt, `--new-tokens` new tokens with no early stop; median of
`--repeat` runs after a warm-up; tokens/s and % of floor (below), first-token latency (the time of a
1-token run: the prefill plus one token), and whether the tokens equal the first row's (the
pipeline's path before numpy's BLAS).

Rows:
  gill_decode, torch matmuls   the pipeline's decoding before numpy's BLAS (`numpy_blas=False`): the
                       reference tokens every other row is compared with
  gill_decode, module step     transformers `generate` + GILL's logits processors, CPU float32
                       matmuls through numpy's BLAS (`fused_step=False`: the default before the fused step)
  gill_decode, numpy step, OpenBLAS gemv   the prompt's pass as above, then each cached step as one
                       fused numpy function (`cpu_decode_gill.NumpyLlamaDecoder`) inside GILL's own
                       copy of the generate loop, its matrix-vector products by numpy's OpenBLAS
                       (the default before the compiled kernels, and wherever they cannot be built)
  gill_decode, numpy step   the same, with the matrix-vector products by the streaming kernel of
                       `cpu_kernels_gill` (the default before the compiled step)
  gill_decode          the pipeline's decoding today: each cached step as one call of the compiled
                       Llama step of `cpu_kernels_gill` (batch 1)
  generate             the bare LM's `generate` (DynamicCache)
  generate, static     `generate(cache_implementation="static")`
  loop, dynamic        a hand-written greedy loop over the LM's forward with a DynamicCache: no
                       processors, no stopping criteria (what `generate` adds on top of the LM)
  loop, static         the same loop with a StaticCache
  loop, static, compiled   the same with `torch.compile` of the forward (opt-in; `--compile`); its
                       one-off compile time is reported as warm-up
  bf16 rows            the same LM in bf16, against its own floor (half the bytes); numpy has no
                       bf16, so every bf16 row keeps torch's matmuls
Every row after the first runs inside `numpy_blas_linears`, as the pipeline does. Two rates: tok/s
over the whole call (the prefill included) and the decode rate, (n - 1) / (time of n tokens - time
of 1 token), which leaves the prefill out (it is the first-token latency). The read bandwidth is
measured before the first row and after every row, and each row's floor uses the mean of the readings
just before and after it: this machine's readings drift by up to 1.8x within minutes (other tenants).

Then (`--profile`) where a token's time goes: in the pipeline's decoding, the compiled step (one
call, timed around it) and the loop around it (GILL's logits processors, embeddings, stopping); in
the numpy step, its products (timed around each call) and its other numpy work; in a module step (loop, DynamicCache), the BLAS products, torch's
operators (torch.profiler, by self CPU time) and the rest (Python). `--kernels`: the LM's matmuls
alone in five forms. `--interleaved R`: the five `gill_decode` rows in turn, R rounds in one process
(the fairest comparison of paths on a host whose bandwidth drifts), each round with its own floor.

    python benchmarks/bench_decoding.py --threads 2                      # idle machine
    python benchmarks/bench_decoding.py --threads 2 --compile --bf16 --profile --kernels --interleaved 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from bench_pipeline import no_stop_token_ids, prompt_ids, read_bandwidth, smollm2_gill, timed, weight_bytes

from gill_hf.pipelines import cpu_blas_gill, cpu_decode_gill, cpu_kernels_gill
from gill_hf.pipelines.cpu_blas_gill import numpy_blas_linears

PROMPT_TOKENS = 64


def decoders(model, tokenizer, ids: torch.Tensor, compile_step: bool) -> dict:
    """name -> fn(n) returning the n new token ids, for GILL `model` (random heads on the LM) and its LM."""
    from transformers import DynamicCache, StaticCache

    from gill_hf.pipelines.decoding_gill import GillDecodingOptions, gill_decode

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

    token_ids = no_stop_token_ids(model, tokenizer.eos_token_id)

    def pipeline(numpy_blas: bool, fused_step: bool):
        def run(n):
            # text only and no stop, as the other rows: [IMG0] masked for all n tokens
            options = GillDecodingOptions(max_new_tokens=n, min_word_tokens=n, numpy_blas=numpy_blas, fused_step=fused_step)
            return gill_decode(model, ids, mask, None, options, token_ids, [None])[0].token_ids

        return run

    def without_kernels(run, *modules):
        """`run` with `cpu_kernels()` giving None in `modules`: in cpu_decode_gill, no compiled step; in
        cpu_blas_gill, no streaming gemv."""
        def wrapped(n):
            kernels = [module.cpu_kernels for module in modules]
            for module in modules:
                module.cpu_kernels = lambda: None
            try:
                return run(n)
            finally:
                for module, original in zip(modules, kernels):
                    module.cpu_kernels = original

        return wrapped

    def with_numpy_blas(run):
        def wrapped(n):
            with numpy_blas_linears(model):
                return run(n)

        return wrapped

    rows = {"generate": generate(), "generate, static": generate(cache_implementation="static"),
            "loop, dynamic": loop(lambda n: DynamicCache(config=lm.config), plain_forward), "loop, static": loop(static, plain_forward)}
    if compile_step:
        rows["loop, static, compiled"] = loop(static, torch.compile(plain_forward, dynamic=False))
    return {"gill_decode, torch matmuls": pipeline(False, False), "gill_decode, module step": pipeline(True, False),
            "gill_decode, numpy step, OpenBLAS gemv": without_kernels(pipeline(True, True), cpu_decode_gill, cpu_blas_gill),
            "gill_decode, numpy step": without_kernels(pipeline(True, True), cpu_decode_gill), "gill_decode": pipeline(True, True),
            **{name: with_numpy_blas(run) for name, run in rows.items()}}


def bench(dtype: torch.dtype, args) -> None:
    model, processor = smollm2_gill(dtype)
    lm, ids = model.language_model, prompt_ids(processor, PROMPT_TOKENS)
    results, reference = [], None
    bandwidth = read_bandwidth(args.repeat)
    with torch.inference_mode():
        for name, run in decoders(model, processor.tokenizer, ids, args.compile).items():
            start = time.perf_counter()
            run(args.new_tokens), run(1)  # warm-up at the timed lengths (a static cache's size is part of a compiled graph)
            warm_up = time.perf_counter() - start
            seconds, tokens = timed(lambda: run(args.new_tokens), args.repeat)
            first, _ = timed(lambda: run(1), args.repeat)
            reference = reference or tokens
            verdict = "same" if tokens == reference else f"differ from step {next(i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b)}"
            # the machine's bandwidth drifts (other tenants): each row against the readings just before and after it
            before, bandwidth = bandwidth, read_bandwidth(args.repeat)
            results.append((name, args.new_tokens / seconds, (args.new_tokens - 1) / (seconds - first), first, warm_up,
                            verdict, (before + bandwidth) / 2))
    print(f"\n## SmolLM2-135M {str(dtype).replace('torch.', '')}: weights {weight_bytes(lm) / 2**20:.1f} MiB read per token; "
          f"floor = the row's read bandwidth / weight bytes")
    print(f"{'path':<38} | {'tok/s':>6} | {'% floor':>7} | {'decode tok/s':>12} | {'% floor':>7} | {'first token s':>13} | "
          f"{'warm-up s':>9} | {'GB/s':>5} | {'floor':>5} | tokens vs the first row")
    for name, rate, decode_rate, first, warm_up, verdict, row_bandwidth in results:
        floor = row_bandwidth / weight_bytes(lm)
        print(f"{name:<38} | {rate:>6.1f} | {rate / floor:>6.1%} | {decode_rate:>12.1f} | {decode_rate / floor:>6.1%} | "
              f"{first:>13.3f} | {warm_up:>9.1f} | {row_bandwidth / 1e9:>5.1f} | {floor:>5.1f} | {verdict}")
    if args.profile and dtype == torch.float32:  # numpy's BLAS is float32 only
        profile_fused_step(model, ids, args.repeat, args.new_tokens)
        profile_step(model, ids, args.repeat)


def interleaved(args) -> None:
    """The `gill_decode` paths in turn, `args.interleaved` rounds in one process: decode rates (the
    prefill left out) and, per round, % of the floor read just before and after it."""
    model, processor = smollm2_gill(torch.float32)
    ids = prompt_ids(processor, PROMPT_TOKENS)
    paths = {name: run for name, run in decoders(model, processor.tokenizer, ids, False).items() if name.startswith("gill_decode")}
    n, weights = args.new_tokens, weight_bytes(model.language_model)
    rates, shares, tokens = {name: [] for name in paths}, {name: [] for name in paths}, {}
    print(f"\n## interleaved: the gill_decode paths in turn, {args.interleaved} rounds, decode tok/s (% of the round's floor)")
    with torch.inference_mode():
        for run in paths.values():
            run(n), run(1)  # warm-up
        for round_index in range(args.interleaved):
            before = read_bandwidth(args.repeat)
            for name, run in paths.items():
                first, _ = timed(lambda: run(1))
                seconds, tokens[name] = timed(lambda: run(n))
                rates[name].append((n - 1) / (seconds - first))
            bandwidth = (before + read_bandwidth(args.repeat)) / 2
            for name in paths:
                shares[name].append(rates[name][-1] / (bandwidth / weights))
            print(f"round {round_index + 1} ({bandwidth / 1e9:.1f} GB/s): "
                  + "; ".join(f"{name} {rates[name][-1]:.1f} ({shares[name][-1]:.0%})" for name in paths))
    fastest, reference = rates["gill_decode"], tokens["gill_decode, torch matmuls"]
    for name in paths:
        print(f"{name:<38} median {statistics.median(rates[name]):6.1f} decode tok/s, {statistics.median(shares[name]):4.0%} of "
              f"the floor (rounds {min(shares[name]):.0%}-{max(shares[name]):.0%}), gill_decode / this "
              f"{statistics.median(f / r for f, r in zip(fastest, rates[name])):.2f}x, tokens "
              f"{'same' if tokens[name] == reference else 'differ'}")


def profile_fused_step(model, ids: torch.Tensor, repeat: int, new_tokens: int) -> None:
    """Where a token of the pipeline's decoding goes (`gill_decode`, `new_tokens` tokens, the median of
    `repeat` runs): the step, timed around each call, and the loop around it (GILL's processors,
    embeddings, logits columns, stopping); for the compiled step (one C call: products, norms,
    attention and all) and for the numpy step, whose products (`blas_product`, timed around each call:
    the streaming kernel where it was built) are split from its other numpy work."""
    from gill_hf.pipelines.decoding_gill import GillDecodingOptions, gill_decode

    lm, mask = model.language_model, torch.ones_like(ids)
    token_ids = no_stop_token_ids(model, pad_token_id=0)
    totals = {"blas": 0.0, "step": 0.0, "steps": 0}
    blas_product, step, kernels = cpu_decode_gill.blas_product, cpu_decode_gill.NumpyLlamaDecoder.step, cpu_decode_gill.cpu_kernels

    def timed_blas(rows, matrix):
        start = time.perf_counter()
        out = blas_product(rows, matrix)
        totals["blas"] += time.perf_counter() - start
        return out

    def timed_step(self, embeddings):
        start = time.perf_counter()
        out = step(self, embeddings)
        totals["step"], totals["steps"] = totals["step"] + time.perf_counter() - start, totals["steps"] + 1
        return out

    def run(n):
        options = GillDecodingOptions(max_new_tokens=n, min_word_tokens=n)
        gill_decode(model, ids, mask, None, options, token_ids, [None])

    cpu_decode_gill.blas_product, cpu_decode_gill.NumpyLlamaDecoder.step = timed_blas, timed_step
    try:
        for name, step_kernels in (("compiled step", kernels), ("numpy step", lambda: None)):
            cpu_decode_gill.cpu_kernels, samples = step_kernels, []
            for _ in range(repeat + 1):  # the first is a warm-up
                run(1)
                first = time.perf_counter()
                run(1)
                first = time.perf_counter() - first
                totals.update(blas=0.0, step=0.0, steps=0)
                start = time.perf_counter()
                run(new_tokens)
                per_token = (time.perf_counter() - start - first) / totals["steps"]
                samples.append((per_token, totals["step"] / totals["steps"], totals["blas"] / totals["steps"]))
            per_token, step_seconds, blas = sorted(samples[1:])[repeat // 2]
            bandwidth, weights = read_bandwidth(repeat), weight_bytes(lm)
            inside = (f"the step {step_seconds * 1e3:.1f} ms ({weights / step_seconds / 1e9:.1f} GB/s of weights)" if not blas else
                      f"the products {blas * 1e3:.1f} ms ({weights / blas / 1e9:.1f} GB/s) + the step's other numpy work "
                      f"{(step_seconds - blas) * 1e3:.1f} ms")
            print(f"\none token of the pipeline's decoding ({name}), median of {repeat}: {per_token * 1e3:.1f} ms = {inside} + "
                  f"the loop around it {(per_token - step_seconds) * 1e3:.1f} ms; read bandwidth just after "
                  f"{bandwidth / 1e9:.1f} GB/s, so the weights alone take {weights / bandwidth * 1e3:.1f} ms (the prompt's pass excluded)")
    finally:
        cpu_decode_gill.blas_product, cpu_decode_gill.NumpyLlamaDecoder.step = blas_product, step
        cpu_decode_gill.cpu_kernels = kernels


def profile_step(model, ids: torch.Tensor, repeat: int, steps: int = 8) -> None:
    """Where `steps` cached single-token steps (loop, dynamic, numpy's BLAS as the pipeline uses it)
    spend their time: the BLAS products (timed around each call; torch.profiler cannot see them),
    torch's operators by self CPU time, and the rest (Python, module calls)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    lm = model.language_model
    blas_seconds = [0.0]
    numpy_linear = cpu_blas_gill.numpy_linear

    def timed_linear(input, weight):
        start = time.perf_counter()
        out = numpy_linear(input, weight)
        blas_seconds[0] += time.perf_counter() - start
        return out

    cache = DynamicCache(config=lm.config)
    token = torch.tensor([[lm.config.bos_token_id or 1]])
    cpu_blas_gill.numpy_linear = timed_linear  # `numpy_blas_linears` calls it through the module
    try:
        with torch.inference_mode(), numpy_blas_linears(model):
            lm(input_ids=ids, past_key_values=cache, use_cache=True)
            for _ in range(2):
                lm(input_ids=token, past_key_values=cache, use_cache=True)
            blas_seconds[0], start = 0.0, time.perf_counter()
            for _ in range(steps):
                lm(input_ids=token, past_key_values=cache, use_cache=True)
            step, blas = (time.perf_counter() - start) / steps, blas_seconds[0] / steps
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    lm(input_ids=token, past_key_values=cache, use_cache=True)
    finally:
        cpu_blas_gill.numpy_linear = numpy_linear
    averages, bandwidth = prof.key_averages(), read_bandwidth(repeat)
    operators = sum(event.self_cpu_time_total for event in averages) / 1e6 / steps
    print(f"\none cached module step (loop, dynamic, numpy's BLAS), mean of {steps}: {step * 1e3:.1f} ms = BLAS products "
          f"{blas * 1e3:.1f} ms ({weight_bytes(lm) / blas / 1e9:.1f} GB/s) + torch operators ~{operators * 1e3:.1f} ms "
          f"(measured under the profiler) + the rest ~{(step - blas - operators) * 1e3:.1f} ms; read bandwidth just after "
          f"{bandwidth / 1e9:.1f} GB/s, so the weights alone take {weight_bytes(lm) / bandwidth * 1e3:.1f} ms")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12))


def kernel_bandwidth(lm, repeat: int) -> None:
    """The LM's matmuls alone, at batch 1, on copies of its weight shapes (so nothing stays in cache
    between layers): `F.linear` as the LM calls it, against the same products with the weights stored
    transposed, with oneDNN-packed weights, numpy's OpenBLAS gemv, and as `numpy_blas_linears` routes
    them (the streaming kernel of `cpu_kernels_gill` where it was built; the last four change the summation
    order, so they are not bit-identical)."""
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
    linears = torch.nn.ModuleList(torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
    for linear, w in zip(linears, weights):
        linear.weight.data = w
    variants = {"F.linear (the LM's call)": (lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], None),
                "weights stored transposed": (lambda: [inputs[w.shape[0]] @ w for w in transposed], None),
                "oneDNN-packed weights": (lambda: [m(inputs[m.weight.shape[1]]) for m in packed], None),
                "numpy's OpenBLAS gemv": (lambda: [w.numpy().dot(inputs[w.shape[1]][0].numpy()) for w in weights], None),
                "numpy_blas_linears (default)": (lambda: [m(inputs[m.in_features]) for m in linears], linears)}
    kernel = "the streaming kernel" if cpu_kernels_gill.cpu_kernels() is not None else "no streaming kernel: numpy's BLAS"
    print(f"\nthe LM's {len(weights)} matmuls per token (fp32, {total / 2**20:.0f} MiB, distinct weights; read bandwidth "
          f"now {read_bandwidth(repeat) / 1e9:.1f} GB/s; numpy_blas_linears uses {kernel}):")
    with torch.inference_mode():
        for name, (run, routed) in variants.items():
            with numpy_blas_linears(routed if routed is not None else torch.nn.Module()):
                run()
                seconds, _ = timed(run, repeat)
            print(f"{name:<28} {seconds * 1e3:6.1f} ms/token, {total / seconds / 1e9:5.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd step (slow warm-up)")
    parser.add_argument("--bf16", action="store_true", help="also the bf16 LM, against its own floor")
    parser.add_argument("--profile", action="store_true", help="profile one cached step per dtype")
    parser.add_argument("--kernels", action="store_true", help="the LM's matmuls alone, five forms")
    parser.add_argument("--interleaved", type=int, default=0, metavar="R", help="also the gill_decode paths in turn, R rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"config: threads={args.threads}, batch=1, greedy, prompt={PROMPT_TOKENS} tokens, new={args.new_tokens}, "
          f"median of {args.repeat} after warm-up, "
          f"load average at start {load:.2f}, cpu={platform.processor() or platform.machine()}, torch {torch.__version__}")
    for dtype in [torch.float32] + ([torch.bfloat16] if args.bf16 else []):
        bench(dtype, args)
    if args.interleaved:
        interleaved(args)
    if args.kernels:
        kernel_bandwidth(smollm2_gill(torch.float32)[0].language_model, args.repeat)


if __name__ == "__main__":
    main()
