"""Checkpoint forms: full and adapter round trips, Auto classes, atomic saves, broken files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from gill_hf import GillForConditionalGeneration
from gill_hf.modeling import checkpointing
from tiny_models import BOS_ID, IMAGE_TOKEN_ID, tiny_gill, training_batch


def _outputs(model):
    torch.manual_seed(0)
    with torch.no_grad():
        train = model(**training_batch(seed=3))
        prompt = torch.tensor([[IMAGE_TOKEN_ID] * 4 + [BOS_ID, 8, 9]])
        decode = model(input_ids=prompt, pixel_values=torch.ones(1, 3, 32, 32) * 0.5, use_cache=True)
    return train.loss, train.prompt_embeds, decode.logits


def _assert_same_outputs(a, b):
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)


def _save_backbones(model, root):
    text_dir, vision_dir = root / "lm", root / "vision"
    model.language_model.save_pretrained(text_dir)
    model.vision_model.save_pretrained(vision_dir)
    model.config.backbone_references = {"text_model": {"path": str(text_dir)}, "vision_model": {"path": str(vision_dir)}}
    return text_dir, vision_dir


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_full_form_round_trip_gives_identical_outputs(tmp_path, kind):
    model = tiny_gill(kind, seed=11, decision_head_type="hidden")
    model.save_pretrained(tmp_path / "full")
    loaded = GillForConditionalGeneration.from_pretrained(tmp_path / "full")
    _assert_same_outputs(model, loaded)
    assert torch.equal(loaded.decision_head.linear.weight, model.decision_head.linear.weight)
    assert not any(p.requires_grad for p in loaded.language_model.parameters())


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_adapter_form_holds_no_backbone_tensor_and_reloads(tmp_path, kind):
    model = tiny_gill(kind, seed=12)
    _save_backbones(model, tmp_path)
    model.save_pretrained(tmp_path / "adapter", form="adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["config.json", "gill_adapter.safetensors", "gill_manifest.json"]
    keys = set(load_file(tmp_path / "adapter" / "gill_adapter.safetensors"))
    assert not any(k.startswith(("language_model.", "vision_model.")) for k in keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert keys == trainable
    loaded = GillForConditionalGeneration.from_pretrained(tmp_path / "adapter")
    _assert_same_outputs(model, loaded)


def test_auto_model_loads_both_forms(tmp_path):
    model = tiny_gill("opt", seed=13)
    _save_backbones(model, tmp_path)
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "adapter", form="adapter")
    for folder in ("full", "adapter"):
        loaded = AutoModel.from_pretrained(tmp_path / folder)
        assert isinstance(loaded, GillForConditionalGeneration)
        _assert_same_outputs(model, loaded)


def test_adapter_form_needs_references(tmp_path):
    model = tiny_gill("opt")
    with pytest.raises(ValueError, match="backbone_references"):
        model.save_pretrained(tmp_path / "adapter", form="adapter")
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(ValueError, match="form"):
        model.save_pretrained(tmp_path / "x", form="lora")


def test_adapter_with_mismatched_backbone_is_rejected(tmp_path):
    model = tiny_gill("opt", seed=14)
    _save_backbones(model, tmp_path)
    model.save_pretrained(tmp_path / "adapter", form="adapter")
    other = tiny_gill("llama")  # a different LM (rows 320 instead of 305)
    other.language_model.save_pretrained(tmp_path / "other_lm")
    with pytest.raises(ValueError, match="text_model backbone has vocab_size=320"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "adapter", text_model=str(tmp_path / "other_lm"))


def test_save_killed_midway_leaves_no_loadable_partial_folder(tmp_path, monkeypatch):
    model = tiny_gill("opt", seed=15)
    _save_backbones(model, tmp_path)

    def crash(_model, folder, *_variant):
        (folder / checkpointing.ADAPTER_WEIGHTS_NAME).write_bytes(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("gill_hf.modeling.checkpoint_forms.save_adapter_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "new", form="adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "vision"]

    # An existing checkpoint survives a crashed overwrite intact.
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "ckpt", form="adapter")
    monkeypatch.setattr("gill_hf.modeling.checkpoint_forms.save_adapter_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "ckpt", form="adapter")
    _assert_same_outputs(model, GillForConditionalGeneration.from_pretrained(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "lm", "vision"]


def test_truncated_and_incomplete_checkpoints_name_the_file_and_key(tmp_path):
    model = tiny_gill("opt", seed=16)
    _save_backbones(model, tmp_path)
    model.save_pretrained(tmp_path / "adapter", form="adapter")
    weights = tmp_path / "adapter" / "gill_adapter.safetensors"
    state = load_file(weights)
    (tmp_path / "adapter" / "gill_manifest.json").unlink()  # a folder from another tool: no manifest to catch it first

    del state["logit_scale"]
    save_file(state, weights)
    with pytest.raises(ValueError, match="gill_adapter.safetensors.*missing keys \\['logit_scale'\\]"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "adapter")

    state["logit_scale"] = torch.zeros(())
    state["mapper.queries"] = torch.zeros(1, 7, 16)
    save_file(state, weights)
    with pytest.raises(ValueError, match="'mapper.queries' has shape \\(1, 7, 16\\)"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "adapter")

    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="gill_adapter.safetensors"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "adapter")

    model.save_pretrained(tmp_path / "full")
    (tmp_path / "full" / "gill_manifest.json").unlink()
    full = tmp_path / "full" / "model.safetensors"
    state = load_file(full)
    del state["mapper.output_proj.bias"]
    save_file(state, full, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mapper.output_proj.bias"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "full")


def test_config_records_the_token_scheme(tmp_path):
    model = tiny_gill("opt")
    model.save_pretrained(tmp_path / "full")
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["model_type"] == "gill_hf"
    assert saved["img_token_ids"] == model.config.img_token_ids and saved["image_token_id"] == IMAGE_TOKEN_ID
    assert saved["text_config"]["model_type"] == "opt" and saved["vision_config"]["model_type"] == "clip_vision_model"


def test_from_pretrained_backbones_and_auto_processor(tmp_path):
    from tiny_tokenizers import opt_like_tokenizer, tiny_image_processor
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    from gill_hf import GillProcessor
    from tiny_models import text_config, vision_config

    tokenizer = opt_like_tokenizer(tmp_path / "tok")
    lm_config = text_config("opt")
    lm_config.vocab_size = len(tokenizer) + 5  # a few spare rows, like OPT's 50272 for 50265 entries
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(lm_config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    # A full dual-encoder CLIP checkpoint: GILL keeps its vision tower.
    clip = CLIPModel(CLIPConfig(vision_config=vision_config().to_dict(),
                                text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "vocab_size": 99}))
    clip.save_pretrained(tmp_path / "clip")

    model = GillForConditionalGeneration.from_pretrained_backbones(
        str(tmp_path / "lm"), str(tmp_path / "clip"), ret_emb_dim=8, gen_emb_dim=12, num_clip_tokens=4,
        mapper_hidden_size=16, mapper_num_heads=2, mapper_ffn_dim=32)
    size = len(opt_like_tokenizer(tmp_path / "tok2"))
    assert model.config.image_token_id == size and model.config.img_token_ids == list(range(size + 1, size + 9))
    assert model.logits_width == size + 9
    vision_state = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    for name, tensor in model.vision_model.state_dict().items():
        assert torch.equal(tensor, vision_state[name])
    # [IMG] rows start at the mean norm of the LM's other rows (`<|image|>`'s included), as the
    # reference keeps them.
    lm_norm = model.get_input_embeddings().weight[: size + 1].norm(dim=-1).mean()
    assert torch.allclose(model.img_embeddings.norm(dim=-1), lm_norm.expand(8), rtol=1e-4)

    processor = GillProcessor(tiny_image_processor(), opt_like_tokenizer(tmp_path / "tok3"))
    assert processor.img_token_ids == model.config.img_token_ids
    model.save_pretrained(tmp_path / "gill", form="adapter")
    processor.save_pretrained(tmp_path / "gill")
    loaded_processor = AutoProcessor.from_pretrained(tmp_path / "gill")
    assert isinstance(loaded_processor, GillProcessor)
    assert loaded_processor.img_token_ids == model.config.img_token_ids
    loaded = AutoModel.from_pretrained(tmp_path / "gill")
    inputs = loaded_processor(text="a red <image> circle", images=[torch.rand(3, 32, 32)])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    # Building the composite config must not touch how the loaded LM attends.
    assert model.language_model.config._attn_implementation == "sdpa"
