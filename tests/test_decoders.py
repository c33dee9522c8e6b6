"""Decoders beyond SD 1.5: the decoder spec, targets from the decoder's own `encode_prompt`, GILL
pipelines for SD 1.x/2.x, SDXL and SD3 whose images equal the decoder pipeline's own for the same
conditioning and seed, a short training run per family, save / load / hub round trips, and clear
errors for unsupported decoders. Tiny random components built in code (tests/tiny_decoders.py).
Budget: about 40 s on 2 cores."""

from __future__ import annotations

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from gill_hf import GillConfig
from gill_hf.data import GillDataCollator, add_generation_targets
from gill_hf.decoders import decoder_config_kwargs, decoder_family, decoder_spec, encode_conditioning, load_decoder
from gill_hf.pipelines import GillPipeline, GillSD3Pipeline, GillXLPipeline
from gill_hf.training import GillTrainer, GillTrainingArguments
from test_hub import FolderHubApi
from test_pipeline import one_thread, seed_hf_cache, seeded, tiny_processor, tiny_sd_pipeline  # noqa: F401
from tiny_decoders import tiny_sd2_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline
from tiny_models import gill_config, tiny_gill

FAMILIES = {  # decoder kind -> (tiny builder, the GILL pipeline class it gets)
    "sd1": (tiny_sd_pipeline, GillPipeline),
    "sd2": (tiny_sd2_pipeline, GillPipeline),
    "sdxl": (tiny_sdxl_pipeline, GillXLPipeline),
    "sd3": (tiny_sd3_pipeline, GillSD3Pipeline),
}
CALL = dict(max_new_tokens=10, force_image=True, max_images=1, num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
            image_source="generated")


def decoder_of(family, tmp_path):
    decoder = FAMILIES[family][0](tmp_path)
    decoder.set_progress_bar_config(disable=True)
    return decoder


def gill_for(decoder, tmp_path, seed=5):
    processor = tiny_processor(tmp_path)
    ids = dict(img_token_ids=processor.img_token_ids, image_token_id=processor.image_token_id, vocab_size=len(processor.tokenizer))
    return tiny_gill("opt", seed=seed, **ids, **decoder_config_kwargs(decoder)), processor


def test_the_spec_defaults_to_sd_1x_and_follows_each_decoder(tmp_path):
    assert GillConfig().decoder_spec == {"family": "stable-diffusion", "tensors": {"prompt_embeds": [77, 768]}}
    old = GillConfig(**{k: v for k, v in gill_config().to_dict().items() if k not in ("decoder_family", "pooled_emb_dim")})
    assert old.decoder_spec["family"] == "stable-diffusion" and old.pooled_emb_dim is None  # configs saved before the spec
    assert decoder_spec(decoder_of("sd2", tmp_path)) == {"family": "stable-diffusion", "tensors": {"prompt_embeds": [6, 24]}}
    assert decoder_spec(decoder_of("sdxl", tmp_path)) == {
        "family": "stable-diffusion-xl", "tensors": {"prompt_embeds": [6, 20], "pooled_prompt_embeds": [10]}}
    assert decoder_spec(decoder_of("sd3", tmp_path)) == {  # 6 CLIP + 256 T5 tokens, T5's width
        "family": "stable-diffusion-3", "tensors": {"prompt_embeds": [262, 16], "pooled_prompt_embeds": [12]}}
    with pytest.raises(ValueError, match="takes pooled conditioning"):
        GillConfig(decoder_family="stable-diffusion-xl", gen_emb_dim=2048)
    with pytest.raises(ValueError, match="decoder_family"):
        GillConfig(decoder_family="flux-dev")


def test_the_pooled_head_is_the_only_addition(tmp_path):
    sd = tiny_gill("opt")
    xl = tiny_gill("opt", decoder_family="stable-diffusion-xl", pooled_emb_dim=10)
    extra = {n: p.numel() for n, p in xl.named_parameters() if n not in dict(sd.named_parameters())}
    width, heads = 16, 2
    assert set(extra) == {"mapper.pooled_head." + n for n in ("query", "attention.in_proj_weight", "attention.in_proj_bias",
                                                               "attention.out_proj.weight", "attention.out_proj.bias",
                                                               "norm.weight", "norm.bias", "proj.weight", "proj.bias")}
    assert sum(extra.values()) == width + 4 * width * width + 4 * width + 2 * width + (width + 1) * 10 and heads == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_gill_images_equal_the_decoder_pipelines_own(family, tmp_path):
    decoder = decoder_of(family, tmp_path)
    model, processor = gill_for(decoder, tmp_path)
    pipe = GillPipeline.from_sd_and_gill(decoder, model, processor)
    assert type(pipe) is FAMILIES[family][1] and pipe.text_encoder is None  # dropped: the unconditional one is stored
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="A dog runs", generator=seeded(3)[0], output_type="pt", **CALL)
    assert out.image_sources == [["generated"]]
    conditioning, unconditional = encode_conditioning(decoder, [""])
    given = {"prompt_embeds": out.prompt_embeds[0], "negative_prompt_embeds": unconditional["prompt_embeds"]}
    if out.pooled_prompt_embeds is not None:
        given.update(pooled_prompt_embeds=out.pooled_prompt_embeds[0], negative_pooled_prompt_embeds=unconditional["pooled_prompt_embeds"])
    else:
        assert family in ("sd1", "sd2")
    # the noise GILL draws for the block: its prompt's generator after decoding (greedy decoding draws nothing)
    channels = (decoder.unet if hasattr(decoder, "unet") else decoder.transformer).config.in_channels
    latents = torch.randn((1, channels, 16 // pipe.vae_scale_factor, 16 // pipe.vae_scale_factor), generator=seeded(3)[0])
    reference = decoder(**given, latents=latents, num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
                        output_type="pt").images[0]
    assert torch.equal(out.images[0][0], reference)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_round_trips_and_a_batch_equals_its_prompts_alone(family, tmp_path):
    decoder = decoder_of(family, tmp_path)
    model, processor = gill_for(decoder, tmp_path)
    pipe = GillPipeline.from_sd_and_gill(decoder, model, processor, keep_text_encoder=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["A dog runs", "Two birds sit on the beach"]
    batch = pipe(prompt=prompts, generator=seeded(1, 2), output_type="np", **CALL)
    alone = [pipe(prompt=prompt, generator=seeded(1 + k)[0], output_type="np", **CALL) for k, prompt in enumerate(prompts)]
    for k in range(2):
        assert batch.token_ids[k] == alone[k].token_ids[0]
        assert np.abs(batch.images[k][0] - alone[k].images[0][0]).max() <= 1 / 255
    first = alone[0].images[0][0]
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == ["pipeline_gill", type(pipe).__name__]
    loaded = GillPipeline.from_pretrained(tmp_path / "saved")  # the base class finds the saved family's class
    assert type(loaded) is type(pipe)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(prompt=prompts[0], generator=seeded(1)[0], output_type="np", **CALL)
    assert again.token_ids[0] == batch.token_ids[0] and np.array_equal(again.images[0][0], first)
    # negative prompts go through the decoder's own encoder; its pooled negative comes with it
    negative = pipe(prompt=prompts[0], negative_prompt="a cat", generator=seeded(1)[0], output_type="np", **CALL)
    assert not np.array_equal(negative.images[0][0], first)
    api = FolderHubApi(tmp_path / "hub")
    pipe.push_to_hub("org/gill-xl", api=api)
    seed_hf_cache(tmp_path / "hub" / "org/gill-xl", "org/gill-xl", tmp_path / "cache")
    pulled = GillPipeline.from_pretrained("org/gill-xl", cache_dir=tmp_path / "cache")
    pulled.set_progress_bar_config(disable=True)
    assert np.array_equal(pulled(prompt=prompts[0], generator=seeded(1)[0], output_type="np", **CALL).images[0][0], first)


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_are_the_decoders_own_encoding_and_training_lowers_the_generation_loss(family, tmp_path):
    decoder = decoder_of(family, tmp_path)
    decoder.save_pretrained(tmp_path / "decoder")
    captions = [f"{a} {b}" for a in ("A dog", "The cat", "Two birds", "A red car") for b in ("runs.", "sits on the beach.")]
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in captions]
    features = datasets.Features({"caption": datasets.Value("string"), "image": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"caption": captions, "image": images}, features=features)
    with_targets = add_generation_targets(dataset, str(tmp_path / "decoder"), batch_size=4)
    expected, _ = encode_conditioning(decoder, captions)
    np.testing.assert_array_equal(np.asarray(with_targets["gen_targets"], dtype=np.float16),
                                  expected["prompt_embeds"].numpy().astype(np.float16))
    if "pooled_prompt_embeds" in expected:
        np.testing.assert_array_equal(np.asarray(with_targets["gen_pooled_targets"], dtype=np.float16),
                                      expected["pooled_prompt_embeds"].numpy().astype(np.float16))

    model, processor = gill_for(decoder, tmp_path)
    model.train()
    collator = GillDataCollator(processor, max_length=16, num_clip_tokens=model.config.num_clip_tokens,
                                gen_emb_dim=model.config.gen_emb_dim, pooled_emb_dim=model.config.pooled_emb_dim)
    args = GillTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=25, per_device_train_batch_size=8, learning_rate=1e-2,
                                 logging_steps=1, report_to=[], save_strategy="no", concat_captions_prob=0.0, warmup_steps=0,
                                 use_cpu=True, seed=0)
    trainer = GillTrainer(model=model, args=args, train_dataset=with_targets, data_collator=collator, processing_class=processor)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "gen_loss" in entry]
    assert logs[-1]["gen_loss"] < 0.7 * logs[0]["gen_loss"], (logs[0], logs[-1])
    if family in ("sdxl", "sd3"):
        pooled = [entry["gen_pooled_loss"] for entry in logs]
        assert pooled[-1] < 0.7 * pooled[0]


def test_unsupported_or_incomplete_decoders_are_named(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match="is a 'KandinskyPipeline'; GILL decodes with"):
        decoder_family(folder)
    decoder_of("sdxl", tmp_path).save_pretrained(tmp_path / "xl")
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lacks \['text_encoder_2'\]"):
        load_decoder(tmp_path / "xl")
    sd_model, processor = tiny_gill("opt"), tiny_processor(tmp_path)
    with pytest.raises(ValueError, match="was trained for a 'stable-diffusion' decoder"):
        GillXLPipeline.from_sd_and_gill(decoder_of("sdxl", tmp_path), sd_model, processor)
    with pytest.raises(ValueError, match="mapper produces"):
        GillPipeline.from_sd_and_gill(decoder_of("sdxl", tmp_path),
                                      tiny_gill("opt", decoder_family="stable-diffusion-xl", pooled_emb_dim=7), processor)
    with pytest.raises(ValueError, match="gen_pooled_targets"):
        xl = tiny_gill("opt", decoder_family="stable-diffusion-xl", pooled_emb_dim=10).train()
        from tiny_models import training_batch

        xl(**training_batch())


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_pipeline_conventions_hold_for_every_family(family, tmp_path):
    """Latent output, a callback that sees the GILL pipeline and changes the guidance, variants."""
    decoder = decoder_of(family, tmp_path)
    model, processor = gill_for(decoder, tmp_path)
    pipe = GillPipeline.from_sd_and_gill(decoder, model, processor)
    pipe.set_progress_bar_config(disable=True)
    latent = pipe(prompt="A dog", generator=seeded(4)[0], output_type="latent", **CALL).images[0][0]
    assert latent.shape == (4, 16 // pipe.vae_scale_factor, 16 // pipe.vae_scale_factor)
    seen = []

    def stronger_guidance_after_the_first_step(pipeline, step, timestep, callback_kwargs):
        seen.append(type(pipeline))
        pipeline._guidance_scale = 6.0  # (turning guidance off also needs the batch halved, as diffusers' cutoff callbacks do)
        return {}

    plain = pipe(prompt="A dog", generator=seeded(4)[0], output_type="np", **CALL).images[0][0]
    changed = pipe(prompt="A dog", generator=seeded(4)[0], output_type="np", callback_on_step_end=stronger_guidance_after_the_first_step,
                   **CALL).images[0][0]
    assert seen == [type(pipe)] * 2 and not np.array_equal(plain, changed)
    pipe.save_pretrained(tmp_path / "variant", variant="fp16")
    loaded = GillPipeline.from_pretrained(tmp_path / "variant", variant="fp16")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(prompt="A dog", generator=seeded(4)[0], output_type="np", **CALL).images[0][0]
    assert np.array_equal(again, plain)
