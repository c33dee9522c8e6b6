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


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_gradient_checkpointing_checkpoints_the_frozen_lm_and_keeps_gradients(kind):
    batch = training_batch(batch=4, seed=2)
    plain = tiny_gill(kind, seed=5).train()
    baseline = _saved_bytes(plain, batch)
    reference = {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}
    model = tiny_gill(kind, seed=5).train()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and not model.language_model.training  # dropout stays off
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
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


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
