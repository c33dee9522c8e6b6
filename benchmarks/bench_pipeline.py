"""GillPipeline benchmarks: prints tables of numbers measured in one run, after warm-up, with the
configuration beside them.

(a) decoding tokens/s: the pipeline's KV-cached decoding against the reference's method (the whole
    sequence re-run every step; both with numpy's BLAS for the matmuls, as the pipeline decodes) on
    SmolLM2-135M (the embedded LLM), 64-token prompt; outputs
    compared token by token; the memory-bandwidth floor (measured read bandwidth / weight bytes per
    token) and the fraction of it reached (`bench_decoding.py` takes decoding options one by one).
(b) pipeline end-to-end time over the sum of its bare parts (the LM's greedy decoding without GILL's
    rules, by the same engine as the pipeline's + mapper + StableDiffusionPipeline with the same
    prompt_embeds).
(c) retrieval: single-query top-5 latency, memory-mapped load time and batched queries/s for
    indexes of 10 k / 100 k / 1 M entries of dim 256 (fp32).
(d) batched serving on GILL-tiny: 8 prompts of different lengths in one call (one padded decoding
    batch, one denoising batch) against the same prompts one call at a time, 25 DDIM steps: prompts/s,
    images/s, and whether the outputs agree (same token ids; images within 1/255).

    python benchmarks/bench_pipeline.py                       # everything
    python benchmarks/bench_pipeline.py --parts a --new-tokens 32,128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from gill_hf import GillConfig, GillForConditionalGeneration, GillProcessor
from gill_hf.pipelines.cpu_blas_gill import numpy_blas_linears
from gill_hf.pipelines.cpu_decode_gill import NumpyLlamaDecoder, fused_generate
from gill_hf.pipelines.decoding_gill import GillDecodingOptions, GillTokenIds, gill_decode
from gill_hf.retrieval import GillRetrievalIndex

PROMPT = ("Q: Describe a quiet harbour at dawn, with boats, gulls and the light on the water, "
          "then tell me what a painter would see first and why.\nA:") * 4


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Median wall time of `repeat` runs (the last result returned)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def header(title: str, **config) -> None:
    print(f"\n## {title}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))


def smollm2_gill(dtype: torch.dtype, gen_emb_dim: int = 64, num_clip_tokens: int = 16):
    """GILL heads (random) on the embedded SmolLM2-135M and a small random vision tower."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from gill_hf.embedded import SMOLLM2_SHA256, materialise_smollm2

    folder = materialise_smollm2(SMOLLM2_SHA256)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = GillProcessor(CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}), tokenizer)
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=64, patch_size=16)).eval()
    config = GillConfig(text_config=lm.config, vision_config=vision.config, img_token_ids=processor.img_token_ids,
                        image_token_id=processor.image_token_id, vocab_size=len(tokenizer), gen_emb_dim=gen_emb_dim,
                        num_clip_tokens=num_clip_tokens, mapper_hidden_size=128, mapper_ffn_dim=256)
    model = GillForConditionalGeneration(config, language_model=lm, vision_model=vision).eval()
    model.rescale_img_rows_()
    return model, processor


def prompt_ids(processor, length: int = 64) -> torch.Tensor:
    ids = processor(text=PROMPT)["input_ids"][:, :length]
    assert ids.shape[1] == length, "PROMPT is too short"
    return ids


# ----- (a) decoding ---------------------------------------------------------------------------------------


def rerun_decode(model, ids: torch.Tensor, n: int, masked: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """The reference's method: the whole sequence through the LM at every step, no cache (with the same
    CPU matmuls as the pipeline's decoding, so that the two differ only in the method)."""
    embeds = model.embed_tokens(ids)
    tokens, logits_seen = [], []
    with torch.no_grad(), numpy_blas_linears(model):
        for _ in range(n):
            logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[0, -1].float()
            logits = logits.masked_fill(masked, float("-inf"))
            token = int(logits.argmax())
            tokens.append(token)
            logits_seen.append(logits)
            embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[token]]))], dim=1)
    return tokens, logits_seen


def no_stop_token_ids(model, pad_token_id: int) -> GillTokenIds:
    """GILL's ids for text-only timing runs: no EOS or newline stop, so every run makes exactly the
    tokens asked for (with `min_word_tokens` = the token count, [IMG0] stays masked)."""
    return GillTokenIds(img_token_ids=list(model.config.img_token_ids), image_token_id=model.config.image_token_id,
                        vocab_size=model.config.vocab_size, eos_token_id=None, pad_token_id=pad_token_id, newline_token_id=None)


def read_bandwidth(repeat: int = 5, n_bytes: int = 1 << 30) -> float:
    """Bytes read per second by a 1 GB fp32 `sum()` (median of `repeat` after one warm-up): the
    bandwidth a decoding step that streams the weights once could reach."""
    data = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    data.sum()
    seconds, _ = timed(lambda: data.sum(), repeat=repeat)
    return n_bytes / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters; `parameters()` yields a tied embedding / output head once, as a
    decoding step reads it (whole, as the head)."""
    return sum(param.numel() * param.element_size() for param in model.parameters())


def bench_decoding(new_tokens: list[int], dtype: torch.dtype) -> None:
    model, processor = smollm2_gill(dtype)
    ids = prompt_ids(processor)
    mask = torch.ones_like(ids)
    tokenizer = processor.tokenizer
    # Text only, no EOS stop, so both paths make exactly n tokens: [IMG0] stays masked
    # (min_word_tokens = n) and EOS is not a stop token here.
    token_ids = no_stop_token_ids(model, tokenizer.pad_token_id)
    masked = torch.zeros(model.logits_width, dtype=torch.bool)
    masked[list(model.config.img_token_ids)] = True
    masked[model.config.image_token_id] = True
    masked[model.config.vocab_size:] = True

    def cached(n):
        options = GillDecodingOptions(max_new_tokens=n, min_word_tokens=n)
        return gill_decode(model, ids, mask, None, options, token_ids, [None])[0].token_ids

    lm_bytes = weight_bytes(model.language_model)
    bandwidth = read_bandwidth()
    floor = bandwidth / lm_bytes  # tokens/s if every token only streamed the weights once
    header("(a) decoding: KV-cached (pipeline) vs full re-run each step (reference)",
           model="SmolLM2-135M-Instruct (embedded, dequantised Q4_1)", dtype=str(dtype).replace("torch.", ""),
           threads=torch.get_num_threads(), prompt_tokens=ids.shape[1], batch=1, greedy=True,
           weight_MB=round(lm_bytes / 2**20, 1), read_bandwidth_GBps=round(bandwidth / 1e9, 2),
           cpu=platform.processor() or platform.machine())
    cached(4), rerun_decode(model, ids, 4, masked)  # warm-up
    print(f"{'new tokens':>10} | {'cached tok/s':>12} | {'re-run tok/s':>12} | {'speed-up':>8} | {'floor tok/s':>11} | {'of floor':>8} | outputs")
    for n in new_tokens:
        t_cached, a = timed(lambda: cached(n))
        t_rerun, (b, logits) = timed(lambda: rerun_decode(model, ids, n, masked))
        if a == b:
            verdict = "identical"
        else:
            step = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            top2 = logits[step].topk(2).values
            verdict = f"diverge at step {step} (re-run top-2 gap {float(top2[0] - top2[1]):.3g})"
        rate_cached, rate_rerun = n / t_cached, n / t_rerun
        print(f"{n:>10} | {rate_cached:>12.1f} | {rate_rerun:>12.1f} | {rate_rerun and rate_cached / rate_rerun:>7.2f}x | "
              f"{floor:>11.1f} | {rate_cached / floor:>7.1%} | {verdict}")


# ----- (b) pipeline vs its bare parts ------------------------------------------------------------------


def bench_pipeline(dtype: torch.dtype, steps: int) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from gill_hf.pipelines import GillPipeline

    model, processor = smollm2_gill(dtype)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8).eval()
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    negative = torch.zeros(1, model.config.num_clip_tokens, model.config.gen_emb_dim)
    pipe = GillPipeline(gill_model=model, processor=processor, vae=vae, unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1))
    sd = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for p in (pipe, sd):
        p.set_progress_bar_config(disable=True)
    prompt = PROMPT[:200]
    settings = dict(num_inference_steps=steps, guidance_scale=7.5)

    def end_to_end():
        return pipe(prompt=prompt, max_new_tokens=16, min_word_tokens=8, force_image=True, negative_prompt_embeds=negative,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **settings)

    out = end_to_end()  # warm-up, and the answer's length for the bare LM run
    n_new = len(out.token_ids[0])
    inputs = processor(text=prompt)

    def bare_decode() -> torch.Tensor:
        """The LM's greedy answer of n_new + 1 tokens, no GILL rules, decoded as the pipeline decodes (the
        fused step where the LM takes it); the hidden states of its last 8 tokens. n_new + 1: the answer
        ends with its [IMG] block, whose last token must be fed through the LM too for its hidden state."""
        decoder = NumpyLlamaDecoder.for_model(model.language_model)
        with torch.no_grad(), numpy_blas_linears(model):  # the matmuls the pipeline's decoding uses
            if decoder is None:
                gen = model.generate(**inputs, max_new_tokens=n_new + 1, min_new_tokens=n_new + 1, do_sample=False,
                                     output_hidden_states=True, return_dict_in_generate=True,
                                     pad_token_id=processor.tokenizer.pad_token_id)
                return torch.stack([step[-1][:, -1] for step in gen.hidden_states[-8:]], dim=1)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            _, states = fused_generate(
                model, decoder, lambda: model(**inputs, cache=DynamicCache(config=model.config.text_config), use_cache=True, logits_to_keep=1),
                ids, mask, mask.cumsum(-1) - 1, n_new + 1, lambda sequences, logits: logits,
                lambda sequences, logits: torch.zeros(len(sequences), dtype=torch.bool), processor.tokenizer.pad_token_id)
            return torch.stack(states[-8:], dim=1)

    def bare():
        with torch.no_grad():
            prompt_embeds = model.get_prompt_embeds(bare_decode())
            sd(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0),
               output_type="pt", **settings)

    bare()
    # interleaved, so that the machine's drift between runs falls on both sides alike
    runs = [(timed(end_to_end)[0], timed(bare)[0]) for _ in range(7)]
    t_pipe, t_bare = statistics.median(p for p, _ in runs), statistics.median(b for _, b in runs)
    header("(b) pipeline end-to-end vs the sum of its bare parts",
           model="SmolLM2-135M + random GILL heads, random small UNet/VAE (latent 16x16)", dtype=str(dtype).replace("torch.", ""),
           threads=torch.get_num_threads(), prompt_tokens=inputs["input_ids"].shape[1], new_tokens=n_new,
           num_inference_steps=steps, guidance_scale=7.5)
    print(f"pipeline {t_pipe * 1e3:.0f} ms | bare parts {t_bare * 1e3:.0f} ms | ratio {t_pipe / t_bare:.3f}")


# ----- (c) retrieval --------------------------------------------------------------------------------------


def bench_retrieval(sizes: list[int], dim: int = 256, batch: int = 64, storage=(torch.float32, torch.float16)) -> None:
    header("(c) retrieval: exact top-5 over memory-mapped embeddings", dim=dim,
           compute="fp32 for an fp32 index; a 16-bit index is scanned in its dtype, candidates re-scored in fp32",
           threads=torch.get_num_threads(), batch_queries=batch)
    print(f"{'storage':>8} | {'entries':>9} | {'save s':>7} | {'load ms':>8} | {'top-5 ms (1 query)':>18} | {'queries/s (batch)':>17}")
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in storage:
            for n in sizes:
                embeddings = torch.randn(n, dim, generator=generator).to(dtype)
                folder = Path(tmp) / f"index-{n}"
                t_save, _ = timed(lambda: GillRetrievalIndex.from_embeddings(embeddings, references=[f"{i}.png" for i in range(n)]).save_pretrained(folder))
                del embeddings
                t_load, index = timed(lambda: GillRetrievalIndex.from_pretrained(folder), repeat=3)
                query = torch.randn(dim, generator=generator)
                queries = torch.randn(batch, dim, generator=generator)
                index.search(query, k=5), index.search(queries, k=5)  # warm-up (pages the file in)
                t_one, _ = timed(lambda: index.search(query, k=5), repeat=20)
                t_batch, _ = timed(lambda: index.search(queries, k=5), repeat=5)
                name = str(dtype).replace("torch.", "")
                print(f"{name:>8} | {n:>9} | {t_save:>7.2f} | {t_load * 1e3:>8.1f} | {t_one * 1e3:>18.2f} | {batch / t_batch:>17.0f}")
                del index
                os.sync()


# ----- (d) batched serving ------------------------------------------------------------------------------

SERVING_PROMPTS = [
    "Draw a big red circle in the top left corner.",
    "A small blue square.",
    "Show me a large green triangle at the bottom right, please, on a dark background.",
    "A tiny yellow cross in the center.",
    "Please draw a purple diamond in the top right corner, and make it big.",
    "An orange circle.",
    "Draw a small cyan square near the bottom left corner of the picture.",
    "A big pink triangle at the top.",
]


def bench_serving(steps: int = 25, repeat: int = 3) -> None:
    import numpy as np

    from gill_hf.world.gill_tiny import load_gill_tiny_pipeline

    pipe = load_gill_tiny_pipeline(retrieval=False)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(force_image=True, max_images=1, max_new_tokens=12, num_inference_steps=steps, image_source="generated", output_type="np")

    def generators():
        return [torch.Generator().manual_seed(k) for k in range(len(SERVING_PROMPTS))]

    def batched():
        return pipe(prompt=SERVING_PROMPTS, generator=generators(), **settings)

    def one_at_a_time():
        return [pipe(prompt=p, generator=g, **settings) for p, g in zip(SERVING_PROMPTS, generators())]

    batched(), one_at_a_time()  # warm-up
    t_batch, together = timed(batched, repeat)
    t_alone, alone = timed(one_at_a_time, repeat)
    same_tokens = all(together.token_ids[k] == out.token_ids[0] for k, out in enumerate(alone))
    image_gap = max(float(np.abs(together.images[k][0] - out.images[0][0]).max()) for k, out in enumerate(alone))
    n, images = len(SERVING_PROMPTS), sum(len(i) for i in together.images)
    header("(d) batched serving: 8 GILL-tiny prompts in one call vs one call each", model="GILL-tiny (shipped)",
           threads=torch.get_num_threads(), prompts=n, num_inference_steps=steps, repeat=repeat)
    print(f"one call: {n / t_batch:.2f} prompts/s, {images / t_batch:.2f} images/s | one at a time: {n / t_alone:.2f} prompts/s, "
          f"{images / t_alone:.2f} images/s | speed-up {t_alone / t_batch:.2f}x | tokens identical: {same_tokens}, "
          f"largest image difference {image_gap * 255:.2f}/255")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="a,b,c,d", help="which benchmarks: a, b, c, d")
    parser.add_argument("--new-tokens", default="32,128,512")
    parser.add_argument("--retrieval-sizes", default="10000,100000,1000000")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sd-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    parts = set(args.parts.split(","))
    print(f"# GillPipeline benchmarks (torch {torch.__version__}, {os.cpu_count()} CPUs visible)")
    if "a" in parts:
        bench_decoding([int(n) for n in args.new_tokens.split(",")], dtype)
    if "b" in parts:
        bench_pipeline(dtype, args.sd_steps)
    if "c" in parts:
        bench_retrieval([int(n) for n in args.retrieval_sizes.split(",")])
    if "d" in parts:
        bench_serving()


if __name__ == "__main__":
    main()
