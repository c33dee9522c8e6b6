"""transformers' common model contracts, checked the way its own common tests check them (written
here, not copied): gradient checkpointing that checkpoints, embeddings get/set/resize, the cache
under its earlier name, output flags, `return_dict`, loading info, image features as an output
object, `base_model_prefix`, `generate(inputs_embeds=...)`. Budget: ~10 s."""

import warnings

import pytest
import torch
from tiny_models import BOS_ID, IMAGE_TOKEN_ID, IMG_TOKEN_IDS, tiny_gill, training_batch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from gill_hf import GillForConditionalGeneration


def _saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward pass of one training step (activation memory)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    return total


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_no_split_modules_name_the_backbones_layers_and_the_mapper(kind):
    layer = {"opt": "OPTDecoderLayer", "llama": "LlamaDecoderLayer", "gpt2": "GPT2Block"}[kind]
    assert {"GillMapper", layer, "CLIPEncoderLayer"} <= set(tiny_gill(kind)._no_split_modules)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_gradient_checkpointing_checkpoints_the_frozen_lm_and_keeps_gradients(kind):
    batch = training_batch(batch=4, seed=2)
    plain = tiny_gill(kind, seed=5).train()
    baseline = _saved_bytes(plain, batch)
    reference = {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}
    model = tiny_gill(kind, seed=5).train()
    with pytest.warns(FutureWarning):  # transformers' deprecated name still reaches GILL's checkpointing
        model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing and not model.language_model.training  # dropout stays off
    calls = []
    for layer in model._decoder_layers():
        inner = layer.forward.forward
        layer.forward.forward = lambda *a, _inner=inner, **k: (calls.append(1), _inner(*a, **k))[1]
    checkpointed = _saved_bytes(model, batch)
    layers = len(model._decoder_layers())
    assert len(calls) == 2 * 2 * layers  # two LM passes, each layer run again in the backward pass
    assert checkpointed < 0.8 * baseline, (checkpointed, baseline)
    for name, grad in reference.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    # Every other layer (as transformers' `every_n_layers`); offloaded saved tensors give the same gradients.
    model.zero_grad()
    model.activation_checkpointing_enable(every_n_layers=2, offload=True)
    checkpointed = [i for i, layer in enumerate(model._decoder_layers()) if "_gill_uncheckpointed_forward" in layer.__dict__]
    assert checkpointed == list(range(0, layers, 2))
    _saved_bytes(model, batch)
    for name, grad in reference.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_resize_and_set_input_embeddings_reach_the_lm(tmp_path, kind):
    model = tiny_gill(kind, seed=1)
    rows = model.num_lm_rows
    model.config.backbone_references = {"text_model": "org/lm", "vision_model": "org/vision"}
    model.resize_token_embeddings(rows + 7)
    assert model.language_model.get_input_embeddings().weight.shape[0] == rows + 7
    assert model.language_model.get_output_embeddings().weight.shape[0] == rows + 7  # untied heads too
    assert not any(name.startswith("embed_tokens") for name, _ in model.named_children())
    ids = torch.tensor([[BOS_ID, rows + 3, *IMG_TOKEN_IDS]])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True).logits
        embeds = model.embed_tokens(ids)
    assert torch.isfinite(logits[0, :, rows + 3]).all()  # the new row can be chosen
    assert torch.equal(embeds[0, 2:], model.img_embeddings)  # [IMG] rows still override their ids
    with pytest.raises(ValueError, match="form='adapter'.*resize_token_embeddings"):
        model.save_pretrained(tmp_path / "a", form="adapter")
    from gill_hf.hub import choose_form

    assert choose_form(model, None) == "full"
    model.save_pretrained(tmp_path / "full")
    loaded = GillForConditionalGeneration.from_pretrained(tmp_path / "full")
    assert loaded.num_lm_rows == rows + 7
    other = tiny_gill(kind, seed=2)
    new = torch.nn.Embedding(rows, other.config.text_config.hidden_size)
    other.set_input_embeddings(new)
    assert other.language_model.get_input_embeddings() is new and other.get_input_embeddings() is new


def test_the_cache_under_its_earlier_name_output_flags_and_return_dict():
    model = tiny_gill("llama", seed=3)
    prompt = torch.tensor([[IMAGE_TOKEN_ID] * 4 + [BOS_ID, 8, 9, 10]])
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        first = model(input_ids=prompt, pixel_values=pixels, use_cache=True)
        step = torch.tensor([[11]])
        with_cache = model(input_ids=step, cache=first.cache, use_cache=True).logits
        first_again = model(input_ids=prompt, pixel_values=pixels, use_cache=True)
        with_old_name = model(input_ids=step, past_key_values=first_again.cache, use_cache=True).logits
        assert torch.equal(with_cache, with_old_name)
        as_tuple = model(input_ids=prompt, pixel_values=pixels, use_cache=True, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], first.logits)
        chosen = model(input_ids=prompt, pixel_values=pixels, use_cache=True, output_hidden_states=[0, -1])
        assert len(chosen.hidden_states) == 2
        model.config.output_hidden_states = True
        every = model(input_ids=prompt, pixel_values=pixels, use_cache=True)
        assert len(every.hidden_states) == model.config.text_config.num_hidden_layers + 1
        assert torch.equal(every.hidden_states[-1], chosen.hidden_states[1])


def test_loading_info_dtype_alias_image_features_prefix_and_generate_from_embeddings(tmp_path):
    model = tiny_gill("opt", seed=4)
    text_dir, vision_dir = tmp_path / "lm", tmp_path / "vision"
    model.language_model.save_pretrained(text_dir)
    model.vision_model.save_pretrained(vision_dir)
    model.config.backbone_references = {"text_model": {"path": str(text_dir)}, "vision_model": {"path": str(vision_dir)}}
    model.save_pretrained(tmp_path / "adapter", form="adapter")
    model.save_pretrained(tmp_path / "full")
    for folder in ("adapter", "full"):
        loaded, info = GillForConditionalGeneration.from_pretrained(tmp_path / folder, output_loading_info=True)
        assert isinstance(loaded, GillForConditionalGeneration) and not info["missing_keys"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf16 = GillForConditionalGeneration.from_pretrained(tmp_path / "adapter", torch_dtype=torch.bfloat16)
    assert bf16.language_model.dtype == torch.bfloat16 and any("torch_dtype" in str(w.message) for w in caught)
    features = model.get_image_features(torch.rand(2, 3, 32, 32), output_hidden_states=True)
    assert isinstance(features, BaseModelOutputWithPooling) and features.pooler_output.shape[0] == 2
    assert features.hidden_states is not None
    assert isinstance(getattr(model, model.base_model_prefix), torch.nn.Module)
    ids = torch.tensor([[BOS_ID, 8, 9, 10]])
    with torch.no_grad():
        from_ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        from_embeds = model.generate(inputs_embeds=model.embed_tokens(ids), attention_mask=torch.ones_like(ids),
                                     max_new_tokens=4, do_sample=False)
    assert from_embeds[0].tolist() == from_ids[0, ids.shape[1]:].tolist()


# ----- diffusers' common pipeline contracts ---------------------------------------------------------


def _pipeline(tmp_path, **kwargs):
    from test_pipeline import tiny_pipeline

    return tiny_pipeline(tmp_path, **kwargs)


CALL = dict(prompt="A dog runs", max_new_tokens=10, force_image=True, num_inference_steps=2, guidance_scale=2.0)


def test_variants_save_and_load_every_component_incl_a_dataset_backed_index(tmp_path):
    import datasets
    import numpy as np
    import PIL.Image

    from gill_hf import GillPipeline, GillRetrievalIndex

    images = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (8, 8), (30 * i, 0, 0)) for i in range(3)]})
    index = GillRetrievalIndex.from_embeddings(torch.randn(3, 16), dataset=images)
    pipe = _pipeline(tmp_path, retrieval_index=index)
    pipe.save_pretrained(tmp_path / "p", variant="fp16")
    names = {p.relative_to(tmp_path / "p").as_posix() for p in (tmp_path / "p").rglob("*") if p.is_file()}
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "retrieval_index/embeddings.fp16.safetensors"} <= names
    loaded = GillPipeline.from_pretrained(tmp_path / "p", variant="fp16")
    loaded.set_progress_bar_config(disable=True)
    a, b = pipe(generator=torch.Generator().manual_seed(0), output_type="np", image_source="generated", **CALL), \
        loaded(generator=torch.Generator().manual_seed(0), output_type="np", image_source="generated", **CALL)
    assert a.token_ids == b.token_ids and np.array_equal(a.images[0][0], b.images[0][0])
    assert len(loaded.retrieval_index) == 3


def test_optional_components_latent_output_guidance_callbacks_and_mixin(tmp_path):
    pipe = _pipeline(tmp_path, with_text_encoder=False)
    assert pipe.unconditional_embedding is None and pipe.text_encoder is None
    out = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **CALL)  # guidance 2, zeros as uncond
    latent = out.images[0][0]
    assert latent.shape == (pipe.unet.config.in_channels, 8, 8)

    def no_guidance_after_first_step(pipeline, step, timestep, kwargs):
        pipeline._guidance_scale = 1.0
        return kwargs

    changed = pipe(generator=torch.Generator().manual_seed(0), output_type="latent",
                   callback_on_step_end=no_guidance_after_first_step, **CALL).images[0][0]
    assert not torch.equal(changed, latent)  # the loop reads the property a callback changed
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # StableDiffusionMixin
    pipe.disable_freeu()
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **CALL).images[0][0], latent)


def test_plain_diffusion_pipeline_loads_a_saved_gill_pipeline_and_the_model_is_an_adapter(tmp_path):
    from diffusers import DiffusionPipeline

    from gill_hf import GillPipeline, GillRetrievalIndex

    pipe = _pipeline(tmp_path, retrieval_index=GillRetrievalIndex.from_embeddings(torch.randn(3, 16), references=list("abc")))
    model = pipe.gill_model
    model.language_model.save_pretrained(tmp_path / "lm")
    model.vision_model.save_pretrained(tmp_path / "vision")
    model.config.backbone_references = {"text_model": {"path": str(tmp_path / "lm")}, "vision_model": {"path": str(tmp_path / "vision")}}
    pipe.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p/gill_model/gill_adapter.safetensors").is_file() and not (tmp_path / "p/gill_model/model.safetensors").exists()
    plain = DiffusionPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True)
    assert isinstance(plain, GillPipeline)
    loaded = GillPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.bfloat16)
    assert loaded.retrieval_index.embeddings.dtype == torch.bfloat16
    loaded.to(torch.float16)
    assert loaded.retrieval_index.embeddings.dtype == torch.float16


def test_every_committed_world_folder_loads_with_the_standard_classes_and_runs():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    from gill_hf.world.common import asset_path

    sd = StableDiffusionPipeline.from_pretrained(str(asset_path("sd")))  # no dtype argument
    sd.set_progress_bar_config(disable=True)
    image = sd("a red circle in the center", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    clip, processor = CLIPModel.from_pretrained(str(asset_path("clip"))), CLIPProcessor.from_pretrained(str(asset_path("clip")))
    inputs = processor(text=["a red circle"], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.isfinite(clip(**inputs).logits_per_image).all()


# ----- chat messages with images, and transformers' image-text-to-text pipeline ------------------------


def test_apply_chat_template_binds_image_items_to_placeholders(tmp_path):
    import PIL.Image
    from test_pipeline import tiny_processor

    processor = tiny_processor(tmp_path)
    processor.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    image = PIL.Image.new("RGB", (20, 20), "red")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<user> <image> What is it?\n<assistant>"
    batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    direct = processor(text=text, images=[image])
    assert torch.equal(batch["input_ids"], direct["input_ids"]) and torch.equal(batch["pixel_values"], direct["pixel_values"])
    with pytest.raises(ValueError, match="URL"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "x", "image": "https://x/y.png"}]}])


def test_transformers_image_text_to_text_pipeline_matches_greedy_gill_pipeline():
    from gill_hf.world.gill_tiny import GILL_TINY_DIR, load_gill_tiny_pipeline

    if not (GILL_TINY_DIR / "gill_adapter.safetensors").is_file():
        pytest.skip("GILL-tiny is not shipped in this checkout")
    import transformers

    from gill_hf.world.data import sample_example
    from gill_hf.world.render import render_scene

    gill = load_gill_tiny_pipeline(retrieval=False)
    image = render_scene(sample_example(90_000, "validation", 0, num_objects=1)[0])
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is in this picture?"}]}]
    pipe = transformers.pipeline("image-text-to-text", model=gill.gill_model, processor=gill.processor)
    answer = pipe(text=messages, max_new_tokens=16, return_full_text=False)[0]["generated_text"]
    prompt = gill.processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = gill(prompt=prompt, prompt_images=[image], max_new_tokens=16, image_source="generated", num_inference_steps=1)
    assert answer.strip() == expected.text[0].strip() and answer.strip()


def test_plain_generate_starts_an_img_block_only_where_it_fits_in_max_new_tokens():
    # GillPipeline never starts a block the token limit would cut; plain generate() (transformers'
    # pipelines) follows the same rule, or their texts differ where GILL-tiny wants an image late.
    from gill_hf.modeling.modeling_gill import GillBlockLogitsProcessor

    processor = GillBlockLogitsProcessor([5, 6, 7], max_new_tokens=4)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    scores = torch.zeros(1, 10)
    assert processor(prompt, scores)[0, 5] == 0  # 0 generated: a 3-token block fits in 4
    assert processor(torch.cat([prompt, torch.tensor([[1]])], 1), scores)[0, 5] == 0  # 1 + 3 <= 4
    assert processor(torch.cat([prompt, torch.tensor([[1, 2]])], 1), scores)[0, 5] == float("-inf")  # 2 + 3 > 4
    inside = processor(torch.cat([prompt, torch.tensor([[5]])], 1), scores)[0]  # inside a block: only the next row
    assert inside[6] == 0 and torch.isinf(inside[torch.arange(10) != 6]).all()
    unlimited = GillBlockLogitsProcessor([5, 6, 7])
    assert unlimited(torch.zeros(1, 30, dtype=torch.long), scores)[0, 5] == 0 and torch.isinf(unlimited(prompt, scores)[0, 6:8]).all()
