"""GillPipeline: KV-cached decoding against a full re-run loop, batching, the [IMG] rules under
sampling, images, save/load and bad input. Tiny components built in code; the builders here are
reused by test_retrieval.py and test_hub.py."""

from __future__ import annotations

import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from gill_hf import GillForConditionalGeneration, GillProcessor
from gill_hf.pipelines import GillPipeline, GillPipelineOutput
from gill_hf.pipelines.decoding_gill import GillDecodingOptions, gill_decode
from tiny_models import tiny_gill
from tiny_tokenizers import llama_like_tokenizer, opt_like_tokenizer, tiny_image_processor
from torch_threads import torch_threads

GEN_DIM, CLIP_TOKENS = 20, 6


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: torch's thread pool costs far more than it saves on shared cores (a 2-step
    tiny UNet run goes from ~0.1 s to ~10 s under contention), so these tests run single-threaded."""
    with torch_threads(1):
        yield


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=GEN_DIM, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        norm_num_groups=4, sample_size=16, layers_per_block=1,
    ).eval()


def tiny_sd_text_encoder(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=300, hidden_size=GEN_DIM, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=CLIP_TOKENS, projection_dim=GEN_DIM,
                                           bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    tokenizer = opt_like_tokenizer(tmp_path)
    tokenizer.model_max_length = CLIP_TOKENS
    return encoder, tokenizer


def tiny_processor(tmp_path, kind: str = "opt") -> GillProcessor:
    tokenizer = llama_like_tokenizer() if kind == "llama" else opt_like_tokenizer(tmp_path)
    return GillProcessor(tiny_image_processor(), tokenizer)


def tiny_pipeline(tmp_path, kind: str = "opt", seed: int = 7, retrieval_index=None, with_text_encoder: bool = True, **gill_overrides) -> GillPipeline:
    processor = tiny_processor(tmp_path, kind)
    # The model's GILL ids follow the processor's tokenizer (the Llama-like one is smaller).
    ids = dict(img_token_ids=processor.img_token_ids, image_token_id=processor.image_token_id, vocab_size=len(processor.tokenizer))
    model = tiny_gill(kind, seed=seed, **{**ids, **gill_overrides})
    text_encoder, tokenizer = tiny_sd_text_encoder(tmp_path) if with_text_encoder else (None, None)
    pipe = GillPipeline(
        gill_model=model, processor=processor, vae=tiny_vae(), unet=tiny_unet(),
        scheduler=DDIMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer, retrieval_index=retrieval_index,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(n: int, seed: int = 0, size: int = 40) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size + 3 * i, 3), dtype=np.uint8)) for i in range(n)]


def tiny_sd_pipeline(tmp_path) -> StableDiffusionPipeline:
    text_encoder, tokenizer = tiny_sd_text_encoder(tmp_path)
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


FAST = dict(num_inference_steps=2, guidance_scale=2.0)
INF = float("-inf")


# ----- decoding: KV-cached path against the reference's method -------------------------------------


def rerun_loop(pipe, prompt, *, mode, steps, min_word_tokens=0, gen_scale=1.0, force_image=False, max_images=None):
    """GILL decoding written the reference's way: the whole sequence re-run at every step, no cache,
    all 8 [IMG] tokens appended when [IMG0] wins. Returns the answer's ids and its blocks' prompt_embeds."""
    model, tokenizer = pipe.gill_model, pipe.processor.tokenizer
    inputs = pipe.processor(text=prompt)
    embeds = model.embed_prompt(inputs["input_ids"], inputs.get("pixel_values"))
    prompt_length = embeds.shape[1]
    img, eos = list(model.config.img_token_ids), tokenizer.eos_token_id
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    tokens, step, blocks = [], 0, 0
    with torch.no_grad():
        while (step if mode == "reference" else len(tokens)) < steps:
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1].clone()
            logits[img[1:]] = INF
            logits[model.config.vocab_size:] = INF
            if mode == "default":
                logits[model.config.image_token_id] = INF
            allowed = (step if mode == "reference" else len(tokens)) >= min_word_tokens
            if mode == "default":
                allowed = allowed and len(tokens) + 8 <= steps and (max_images is None or blocks < max_images)
            if not allowed:
                logits[img[0]] = INF
                if force_image and blocks == 0:
                    logits[[eos, newline]] = INF
            elif gen_scale > 1:
                logits[img[0]] = logits[img[0]].abs() * gen_scale
            token = img[0] if (allowed and force_image and blocks == 0) else int(logits.argmax())
            new = img if token == img[0] else [token]
            blocks += token == img[0]
            tokens, step = tokens + new, step + 1
            embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([new]))], dim=1)
            if mode == "default" and token == eos:
                tokens.pop()
                break
        hidden = model(inputs_embeds=embeds, use_cache=False, output_hidden_states=True).hidden_states[-1][0, prompt_length:]
    if mode == "reference":
        if newline in tokens and tokens.index(newline) > 0:
            tokens = tokens[: tokens.index(newline)]
        starts = [j for j in range(len(tokens)) if tokens[j : j + 8] == img]
        tokens = tokens[: starts[1]] if len(starts) > 1 else tokens
    starts = [j for j in range(len(tokens)) if tokens[j : j + 8] == img]
    blocks = torch.stack([hidden[j : j + 8] for j in starts])
    with torch.no_grad():
        prompt_embeds = model.get_prompt_embeds(blocks)
    return tokens, prompt_embeds, blocks


@pytest.mark.parametrize("mode,steps", [("default", 16), ("default", 10), ("reference", 5)])
def test_greedy_cached_decoding_equals_a_full_rerun_loop(tmp_path, mode, steps):
    """10 steps: the block ends the answer, so its last state comes from the one extra cached step."""
    pipe = tiny_pipeline(tmp_path)
    prompt = [images(1)[0], "A dog runs across", images(2, seed=1)[1], "the park. Now draw it"]
    if mode == "default":
        settings = dict(steps=steps, min_word_tokens=2, force_image=True)
        out = pipe(prompt=prompt, max_new_tokens=steps, min_word_tokens=2, force_image=True, **FAST)
    else:
        settings = dict(steps=5, min_word_tokens=2, gen_scale=1e5)  # the reference's way to force an image
        out = pipe(prompt=prompt, max_new_tokens=5, min_word_tokens=2, gen_scale_factor=1e5, decoding="reference", **FAST)
    tokens, prompt_embeds, _ = rerun_loop(pipe, prompt, mode=mode, **settings)
    assert out.token_ids[0] == tokens
    assert tokens.count(pipe.gill_model.config.img_token_ids[0]) == 1 and out.text[0].count("<image>") == 1
    torch.testing.assert_close(out.prompt_embeds[0], prompt_embeds, atol=1e-4, rtol=1e-4)


def test_a_model_built_around_an_existing_lm_decodes_with_the_cache_as_without(tmp_path):
    """`GillConfig(text_config=lm.config)` (as `from_pretrained_backbones` builds it) must not leave
    the LM without an attention implementation: cached steps then attended differently."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from gill_hf import GillConfig
    from tiny_models import IMAGE_TOKEN_ID, IMG_TOKEN_IDS, text_config, vision_config

    torch.manual_seed(0)
    lm, vision = LlamaForCausalLM(text_config("llama")).eval(), CLIPVisionModel(vision_config()).eval()
    config = GillConfig(text_config=lm.config, vision_config=vision.config, img_token_ids=IMG_TOKEN_IDS,
                        image_token_id=IMAGE_TOKEN_ID, vocab_size=309, gen_emb_dim=GEN_DIM, num_clip_tokens=CLIP_TOKENS)
    model = GillForConditionalGeneration(config, language_model=lm, vision_model=vision).eval()
    assert lm.config._attn_implementation is not None
    ids = torch.randint(3, 300, (1, 12), generator=seeded(0)[0])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        for step in range(6):
            full = model(input_ids=out.sequences[:, : 12 + step], use_cache=True).logits[0, -1]
            torch.testing.assert_close(out.logits[step][0], full, atol=1e-5, rtol=1e-5)


def test_reference_mode_keeps_the_image_token_as_a_candidate_and_default_mode_never_picks_it(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    model = pipe.gill_model
    with torch.no_grad():  # make `<|image|>` the LM's favourite token (OPT ties its rows)
        model.get_input_embeddings().weight[model.config.image_token_id] *= 200
    ref = pipe(prompt="A dog runs", max_new_tokens=6, decoding="reference", **FAST)
    default = pipe(prompt="A dog runs", max_new_tokens=6, **FAST)
    assert model.config.image_token_id in ref.token_ids[0]
    assert model.config.image_token_id not in default.token_ids[0] and len(default.token_ids[0]) == 6


def boost_eos(pipe, factor: float = 20.0) -> None:
    """Makes EOS likely, so that rows of a batch end at different steps."""
    with torch.no_grad():
        pipe.gill_model.language_model.get_output_embeddings().weight[pipe.processor.tokenizer.eos_token_id] *= factor


def test_truncation_leaves_room_for_a_reference_answer_of_blocks(tmp_path):
    """Reference mode counts a block as one step, so an answer can feed 8 tokens a step: a truncated
    prompt keeps that much of the tiny LM's 128 positions free (the prompt was cut to 108 tokens
    before, and decoding then ran past the context)."""
    pipe = tiny_pipeline(tmp_path)
    out = pipe(prompt="dog cat " * 200, max_new_tokens=12, decoding="reference", gen_scale_factor=50.0, truncation=True,
               output_type="np", **FAST)
    assert len(out.token_ids[0]) > 0 and pipe.gill_model.config.text_config.max_position_embeddings == 128


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_batch_of_prompts_of_different_lengths_equals_each_alone(tmp_path, kind):
    pipe = tiny_pipeline(tmp_path, kind=kind)
    boost_eos(pipe, {"opt": 20.0, "llama": 40.0}[kind])
    prompts, prompt_images = ["A dog runs <image> across the park at night", "Two birds"], [images(1), []]
    settings = dict(max_new_tokens=20, do_sample=True, gen_scale_factor=30.0, force_image=True, min_word_tokens=1,
                    output_type="np", **FAST)
    batch = pipe(prompt=prompts, prompt_images=prompt_images, generator=seeded(1, 2), **settings)
    assert len(set(map(len, batch.token_ids))) == 2, "the rows should end at different steps"
    for i, seed in enumerate((1, 2)):
        alone = pipe(prompt=prompts[i], prompt_images=prompt_images[i], generator=seeded(seed)[0], **settings)
        assert batch.token_ids[i] == alone.token_ids[0] and batch.text[i] == alone.text[0]
        torch.testing.assert_close(batch.prompt_embeds[i], alone.prompt_embeds[0], atol=1e-4, rtol=1e-4)
        assert len(batch.images[i]) == len(alone.images[0]) >= 1
        for a, b in zip(batch.images[i], alone.images[0]):
            assert np.abs(a - b).max() <= 2 / 255


# ----- the [IMG] rules under sampling ---------------------------------------------------------------


def assert_gill_rules(tokens, pipe, max_new_tokens, mode):
    img, image_token = list(pipe.gill_model.config.img_token_ids), pipe.gill_model.config.image_token_id
    j = 0
    while j < len(tokens):
        if tokens[j] == img[0]:
            assert tokens[j : j + 8] == img, f"incomplete block at {j}: {tokens}"
            j += 8
            continue
        assert tokens[j] not in img, f"lone [IMG] token at {j}: {tokens}"
        assert mode == "reference" or tokens[j] != image_token
        assert tokens[j] < pipe.gill_model.config.vocab_size
        j += 1
    if mode == "default":
        assert len(tokens) <= max_new_tokens


@pytest.mark.parametrize("mode,force", [("default", False), ("default", True), ("reference", True)])
def test_img_rules_hold_under_sampling_over_many_seeds(tmp_path, mode, force):
    pipe = tiny_pipeline(tmp_path, kind="llama", with_text_encoder=False)  # llama: padding rows to mask
    boost_eos(pipe, 10.0)
    inputs = pipe.processor(text=["A dog runs <image> and", "the cat", "a red car on the", "Q: what is"],
                            images=[images(1), [], [], []], padding_side="left")
    n_blocks = 0
    for seed in range(6):
        # 13 tokens: a block fits only early, so the budget rule is exercised too.
        options = GillDecodingOptions(max_new_tokens=13 if mode == "default" else 5, do_sample=True, temperature=1.3,
                                      gen_scale_factor=25.0, force_image=force, decoding=mode,
                                      max_images=None if mode == "default" else 1)
        rows = gill_decode(pipe.gill_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                           options, pipe._token_ids(), seeded(*(10 * seed + i for i in range(4))))
        for row in rows:
            assert_gill_rules(row.token_ids, pipe, options.max_new_tokens, mode)
            assert row.img_hidden_states.shape == (len(row.block_starts), 8, 32)
            if force:
                assert len(row.block_starts) >= 1
            n_blocks += len(row.block_starts)
    assert n_blocks > 0


def test_sampling_is_reproducible_with_the_same_generator_and_differs_with_another(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    settings = dict(prompt="A dog runs across", max_new_tokens=16, do_sample=True, force_image=True, output_type="np", **FAST)
    first = pipe(generator=seeded(3)[0], **settings)
    again = pipe(generator=seeded(3)[0], **settings)
    other = pipe(generator=seeded(4)[0], **settings)
    assert first.token_ids == again.token_ids and np.array_equal(first.images[0][0], again.images[0][0])
    assert first.token_ids != other.token_ids


# ----- images ---------------------------------------------------------------------------------------


def test_force_image_max_images_and_size(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True, leave=False)  # a user's bar settings reach GILL's decoding bar too
    out = pipe(prompt=["A dog", "Two birds sit"], max_new_tokens=30, gen_scale_factor=1e5, max_images=2,
               force_image=True, height=24, width=16, **FAST)
    for blocks_text, imgs, sources in zip(out.text, out.images, out.image_sources):
        assert blocks_text.count("<image>") == 2 and len(imgs) == 2 and sources == ["generated"] * 2
        assert all(isinstance(im, PIL.Image.Image) and im.size == (16, 24) for im in imgs)
    assert [p.shape for p in out.prompt_embeds] == [(2, CLIP_TOKENS, GEN_DIM)] * 2
    assert out.retrieval_scores is None and out.decision_probs is None
    text_only = pipe(prompt="A dog", max_new_tokens=6, min_word_tokens=6, **FAST)
    assert "<image>" not in text_only.text[0] and text_only.images == [[]] and text_only.prompt_embeds[0].shape[0] == 0


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_output_types_and_images_per_prompt(tmp_path, output_type):
    pipe = tiny_pipeline(tmp_path)
    out = pipe(prompt="A dog", max_new_tokens=10, force_image=True, num_images_per_prompt=2, output_type=output_type,
               generator=seeded(0)[0], **FAST)
    assert isinstance(out, GillPipelineOutput) and len(out.images[0]) == 2
    kind = {"pil": PIL.Image.Image, "np": np.ndarray, "pt": torch.Tensor}[output_type]
    assert all(isinstance(im, kind) for im in out.images[0])
    shape = {"pil": (16, 16), "np": (16, 16, 3), "pt": (3, 16, 16)}[output_type]
    assert all((im.size if output_type == "pil" else tuple(im.shape)) == shape for im in out.images[0])
    scores = out.generated_scores[0]
    assert scores.shape == (1, 2) and scores[0, 0] >= scores[0, 1]
    as_tuple = pipe(prompt="A dog", max_new_tokens=10, force_image=True, return_dict=False, **FAST)
    assert len(as_tuple) == 10 and as_tuple[9] is None and as_tuple[0] == out.text and as_tuple[5] is None  # no index: retrieval_scores None


def test_generated_images_are_ordered_by_their_retrieval_score(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    model = pipe.gill_model
    out = pipe(prompt="A dog", max_new_tokens=10, force_image=True, num_images_per_prompt=3, output_type="pt", **FAST)
    _, _, hidden = rerun_loop(pipe, "A dog", mode="default", steps=10, force_image=True)
    pil = [PIL.Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in out.images[0]]
    with torch.no_grad():
        image_embeds = model.get_image_retrieval_embeds(pipe.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"])
        text_embed = model.get_text_retrieval_embeds(hidden)[0]
    scores = out.generated_scores[0][0]
    torch.testing.assert_close(scores, image_embeds @ text_embed, atol=1e-4, rtol=1e-4)
    assert torch.all(scores[:-1] >= scores[1:])


def test_negative_prompt_and_given_latents(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    settings = dict(prompt="A dog", max_new_tokens=10, force_image=True, output_type="np", **FAST)
    plain = pipe(generator=seeded(0)[0], **settings)
    negative = pipe(generator=seeded(0)[0], negative_prompt="a red car", **settings)
    assert not np.allclose(plain.images[0][0], negative.images[0][0])
    empty = pipe(generator=seeded(0)[0], negative_prompt="", **settings)
    np.testing.assert_allclose(plain.images[0][0], empty.images[0][0], atol=1e-6)
    latents = torch.randn(1, 4, 8, 8, generator=seeded(9)[0])
    given = pipe(latents=latents, **settings)
    again = pipe(latents=latents, generator=seeded(1)[0], **settings)
    assert np.array_equal(given.images[0][0], again.images[0][0])
    with pytest.raises(ValueError, match="latents"):
        pipe(latents=torch.randn(1, 4, 4, 4), **settings)


def test_callback_on_step_end_can_modify_latents(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    calls = []

    def zero_latents(pipeline, step, timestep, callback_kwargs):
        calls.append(step)
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    settings = dict(prompt="A dog", max_new_tokens=10, force_image=True, output_type="np", generator=seeded(0)[0], **FAST)
    plain = pipe(**settings)
    zeroed = pipe(callback_on_step_end=zero_latents, **settings)
    assert calls == [0, 1]
    with torch.no_grad():
        decoded = pipe.vae.decode(torch.zeros(1, 4, 8, 8) / pipe.vae.config.scaling_factor).sample
    expected = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    np.testing.assert_allclose(zeroed.images[0][0], expected, atol=1e-5)
    assert not np.allclose(plain.images[0][0], zeroed.images[0][0])


# ----- save / load ------------------------------------------------------------------------------------


def seed_hf_cache(folder, repo_id: str, cache_dir) -> None:
    """Lays `folder` out as a cached snapshot of `repo_id`, as huggingface_hub's cache stores it."""
    commit = "0" * 40
    root = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def test_assembled_pipeline_survives_save_load_and_repo_id_load_bit_identically(tmp_path):
    sd = tiny_sd_pipeline(tmp_path)
    sd.save_pretrained(tmp_path / "sd")
    pipe = GillPipeline.from_sd_and_gill(tmp_path / "sd", tiny_gill("opt", seed=7), tiny_processor(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and pipe.unconditional_embedding is not None
    for name in pipe.model_cpu_offload_seq.split("->"):
        assert name in pipe.components
    settings = dict(prompt="A dog <image> runs", prompt_images=images(1), max_new_tokens=12, force_image=True,
                    output_type="np", **FAST)
    before = pipe(generator=seeded(5)[0], **settings)
    pipe.save_pretrained(tmp_path / "gill")
    loaded = GillPipeline.from_pretrained(tmp_path / "gill")
    seed_hf_cache(tmp_path / "gill", "org/tiny-gill", tmp_path / "cache")
    from_repo = GillPipeline.from_pretrained("org/tiny-gill", cache_dir=tmp_path / "cache")
    for other in (loaded, from_repo):
        other.set_progress_bar_config(disable=True)
        assert other.text_encoder is None
        torch.testing.assert_close(other.unconditional_embedding.embeds, pipe.unconditional_embedding.embeds, atol=0, rtol=0)
        after = other(generator=seeded(5)[0], **settings)
        assert after.token_ids == before.token_ids
        assert np.array_equal(after.images[0][0], before.images[0][0])


def test_stored_unconditional_embedding_is_sds_encoding_of_the_empty_prompt(tmp_path):
    sd = tiny_sd_pipeline(tmp_path)
    pipe = GillPipeline.from_sd_and_gill(sd, tiny_gill("opt", seed=7), tiny_processor(tmp_path), keep_text_encoder=True)
    expected = sd.encode_prompt("", "cpu", 1, False)[0]
    torch.testing.assert_close(pipe.unconditional_embedding.embeds, expected)
    torch.testing.assert_close(pipe.encode_negative_prompt(None, None, "cpu", torch.float32), expected)


# ----- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prompt="A <image> and <image>", prompt_images=images(1)), ValueError, "placeholder"),
        (dict(prompt=["A dog", None]), TypeError, "text"),
        (dict(prompt=""), ValueError, "empty"),
        (dict(prompt=[]), ValueError, "empty"),
        (dict(prompt="A dog", num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(prompt="A dog", max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(prompt="A dog", do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(prompt="A dog", force_image=True, max_new_tokens=8, min_word_tokens=2), ValueError, "force_image"),
        (dict(prompt="A dog", image_source="retrieved"), ValueError, "retrieval_index"),
        (dict(prompt="A dog", image_source="both"), ValueError, "image_source"),
        (dict(prompt="A dog", output_type="latents"), ValueError, "output_type"),
        (dict(prompt="A dog", height=21), ValueError, "height"),
        (dict(prompt="A dog", decoding="fast"), ValueError, "decoding"),
        (dict(prompt="A dog", max_images=0), ValueError, "max_images"),
        (dict(prompt=["A dog", "A cat"], generator=seeded(1, 2, 3)), ValueError, "generator"),
        (dict(prompt="A dog " * 200), ValueError, "max_length"),
        (dict(prompt="A dog", max_new_tokens=200), ValueError, "context"),
        (dict(prompt="A dog", negative_prompt="blurry"), ValueError, "negative_prompt"),
        (dict(prompt="A dog", force_image=True, max_new_tokens=8, negative_prompt_embeds=torch.zeros(3, CLIP_TOKENS, GEN_DIM)),
         ValueError, "negative_prompt_embeds"),
        (dict(prompt="A dog", force_image=True, max_new_tokens=8, negative_prompt_embeds=torch.zeros(1, 5, GEN_DIM)),
         ValueError, "negative_prompt_embeds"),
        (dict(prompt="A dog", callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback"),
        (dict(prompt=["A dog", PIL.Image.new("RGB", (0, 4))]), ValueError, "zero-size"),
        (dict(prompt=["A dog", PIL.Image.new("I;16", (8, 8))]), ValueError, "16/32-bit"),
        (dict(prompt=["A dog", torch.full((3, 8, 8), float("nan"))]), ValueError, "NaN"),
        (dict(prompt=["A dog", torch.full((3, 8, 8), 2.0)]), ValueError, r"\[0, 1\]"),
        (dict(prompt=["A dog", np.zeros((8, 8, 4), dtype=np.uint8)]), ValueError, "shape"),
        (dict(prompt="A dog <image>", prompt_images=["not an image"]), TypeError, "expected"),
    ],
)
def test_bad_input_raises_clear_errors(tmp_path, kwargs, error, match):
    pipe = tiny_pipeline(tmp_path, with_text_encoder=False)
    with pytest.raises(error, match=match):
        pipe(**{"max_new_tokens": 4, **FAST, **kwargs})


def test_components_must_agree(tmp_path):
    with pytest.raises(ValueError, match="cross_attention_dim"):
        GillPipeline(gill_model=tiny_gill("opt", gen_emb_dim=12), processor=tiny_processor(tmp_path), vae=tiny_vae(),
                     unet=tiny_unet(), scheduler=DDIMScheduler())


def test_a_batch_draws_each_prompts_noise_from_its_own_generator(tmp_path):
    """With a noisy sampler (DDPM: fresh noise at every step), a batch equals each prompt run alone."""
    from diffusers import DDPMScheduler

    pipe = tiny_pipeline(tmp_path)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = ["A dog runs across the park", "Two birds"]
    settings = dict(max_new_tokens=10, force_image=True, num_inference_steps=3, guidance_scale=2.0, output_type="np")
    batched = pipe(prompt=prompts, generator=seeded(3, 4), **settings)
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt=prompt, generator=seeded(3 + i)[0], **settings)
        assert alone.token_ids[0] == batched.token_ids[i]
        assert np.abs(alone.images[0][0] - batched.images[i][0]).max() <= 1 / 255
