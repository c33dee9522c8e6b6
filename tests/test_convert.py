"""Converting original GILL checkpoints: key mapping, both decision heads, safe unpickling, clear
errors, and a release-shaped folder."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gill_hf import GillForConditionalGeneration
from gill_hf.convert_original import (
    convert_original,
    load_torch_state_dict,
    read_model_args,
)
from gill_hf.safe_loading import load_retrieval_pickle

from conftest import recipe


def test_conversion_maps_every_tensor(fixture_paths, converted):
    original = load_torch_state_dict(Path(fixture_paths["gill_ckpt"]) / "pretrained_ckpt.pth.tar")
    ours = load_file(converted / "gill_adapter.safetensors")
    assert torch.equal(ours["img_embeddings"], original["model.input_embeddings.weight"].float())
    assert torch.equal(ours["mapper.queries"], original["model.gen_text_hidden_fcs.0.query_embs"].float())
    assert torch.equal(ours["mapper.transformer.decoder.layers.3.multihead_attn.in_proj_weight"],
                       original["model.gen_text_hidden_fcs.0.tfm.decoder.layers.3.multihead_attn.in_proj_weight"].float())
    assert torch.equal(ours["text_retrieval_projection.weight"], original["model.ret_text_hidden_fcs.0.model.weight"].float())
    assert len(ours) == len(original) + 2  # + the decision head's weight and bias
    config = json.loads((converted / "config.json").read_text())
    # The tokenizer gains <|image|> and [IMG0..7] in the reference's order: the ids match model_args.json.
    args = json.loads((Path(fixture_paths["gill_ckpt"]) / "model_args.json").read_text())
    assert config["img_token_ids"] == args["retrieval_token_idx"]
    assert config["decision_head_type"] == "hidden" and config["num_visual_tokens"] == 4


def test_converted_folder_loads_with_backbones_and_index(fixture_paths, converted):
    from gill_hf.retrieval import GillRetrievalIndex

    model = GillForConditionalGeneration.from_pretrained(converted)
    assert model.config.backbone_references["text_model"] == fixture_paths["opt"]
    index = GillRetrievalIndex.from_pretrained(converted / "retrieval_index")
    paths, embeddings = load_retrieval_pickle(Path(fixture_paths["gill_ckpt"]) / "cc3m_embeddings_urls.npy")
    assert index.references == paths
    assert torch.allclose(index.embeddings.float(), torch.nn.functional.normalize(embeddings, dim=-1), atol=1e-6)


def test_paper_era_decision_head_is_detected(fixture_paths, tmp_path):
    original = tmp_path / "orig"
    shutil.copytree(fixture_paths["gill_ckpt"], original)
    os.replace(original / "decision_model_4097.pth.tar", original / "decision_model.pth.tar")
    convert_original(original, tmp_path / "out", text_model=fixture_paths["opt"], vision_model=fixture_paths["clip"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["decision_head_type"] == "hidden_and_score"
    assert load_file(tmp_path / "out" / "gill_adapter.safetensors")["decision_head.linear.weight"].shape == (2, 4097)


def test_released_files_carry_cuda_location_tags(fixture_paths):
    # The fixture is saved like the release (storages tagged cuda:0); map_location puts them on CPU.
    raw = (Path(fixture_paths["gill_ckpt"]) / "decision_model.pth.tar").read_bytes()
    assert b"cuda:0" in raw
    state = load_torch_state_dict(Path(fixture_paths["gill_ckpt"]) / "decision_model.pth.tar")
    assert state["1.weight"].device.type == "cpu"


# ----- hostile and broken files --------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_retrieval_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "cc3m_evil.npy"
    evil.write_bytes(pickle.dumps({"paths": ["a"], "embeddings": [_Payload(marker)]}))
    with pytest.raises(ValueError, match="refus.*posix.system|refus.*os.system"):
        load_retrieval_pickle(evil)
    assert not marker.exists()


def test_hostile_torch_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "pretrained_ckpt.pth.tar"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "boom": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="refusing"):
        load_torch_state_dict(evil)
    assert not marker.exists()


def test_retrieval_file_with_torch_bf16_tensors_and_numpy_arrays(tmp_path):
    tensors = tmp_path / "cc3m_torch.npy"
    rows = torch.randn(3, 8).bfloat16()
    tensors.write_bytes(pickle.dumps({"paths": ["a", "b", "c"], "embeddings": list(rows)}))
    paths, embeddings = load_retrieval_pickle(tensors)
    assert paths == ["a", "b", "c"] and torch.equal(embeddings, rows.float())
    arrays = tmp_path / "cc3m_numpy.npy"
    values = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    arrays.write_bytes(pickle.dumps({"paths": ["x", "y"], "embeddings": list(values)}, protocol=2))
    assert torch.equal(load_retrieval_pickle(arrays)[1], torch.from_numpy(values))


def _original_copy(fixture_paths, tmp_path):
    original = tmp_path / "orig"
    shutil.copytree(fixture_paths["gill_ckpt"], original)
    return original


def test_broken_checkpoints_name_the_file_and_key(fixture_paths, tmp_path):
    original = _original_copy(fixture_paths, tmp_path)
    kwargs = dict(text_model=fixture_paths["opt"], vision_model=fixture_paths["clip"])
    ckpt = original / "pretrained_ckpt.pth.tar"
    state = load_torch_state_dict(ckpt)

    del state["model.logit_scale"]
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(ValueError, match="pretrained_ckpt.pth.tar.*missing keys for \\['logit_scale'\\]"):
        convert_original(original, tmp_path / "a", **kwargs)

    state["model.logit_scale"] = torch.zeros(())
    state["model.visual_fc.weight"] = torch.zeros(5, 5)
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(ValueError, match="'image_retrieval_projection.weight' has shape \\(5, 5\\)"):
        convert_original(original, tmp_path / "b", **kwargs)

    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="pretrained_ckpt.pth.tar.*truncated or corrupt"):
        convert_original(original, tmp_path / "c", **kwargs)

    (original / "model_args.json").unlink()
    with pytest.raises(ValueError, match="model_args.json.*does not exist"):
        read_model_args(original)
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing half-written


def test_wrong_decision_head_shape_is_named(fixture_paths, tmp_path):
    original = _original_copy(fixture_paths, tmp_path)
    torch.save({"state_dict": {"1.weight": torch.zeros(2, 100), "1.bias": torch.zeros(2)}}, original / "decision_model.pth.tar")
    with pytest.raises(ValueError, match="decision_model.pth.tar.*'1.weight' has shape \\(2, 100\\)"):
        convert_original(original, tmp_path / "out", text_model=fixture_paths["opt"], vision_model=fixture_paths["clip"])


# ----- a folder shaped like the real release ---------------------------------------------------------


def test_release_shaped_folder_converts_to_100mb_of_bf16(tmp_path):
    from tiny_tokenizers import opt_like_tokenizer, tiny_image_processor
    from transformers import CLIPVisionConfig, OPTConfig

    original = tmp_path / "gill_opt"
    original.mkdir()
    shapes = recipe.gill_param_shapes()  # reference key names at the fixture's sizes (4096 LM, ret 32)
    text_config = OPTConfig(hidden_size=4096, word_embed_proj_dim=4096, ffn_dim=16384, num_hidden_layers=32,
                            num_attention_heads=32, vocab_size=50272)
    vision_config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, patch_size=14, image_size=224)
    real = {name: _release_shape(name, shape) for name, shape in shapes.items()}
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(shape, generator=generator) * 0.01).bfloat16() for name, shape in real.items()}
    torch.save({"state_dict": state}, original / "pretrained_ckpt.pth.tar")
    (original / "model_args.json").write_text(json.dumps({
        "opt_version": "facebook/opt-6.7b", "visual_encoder": "openai/clip-vit-large-patch14", "n_visual_tokens": 4,
        "ret_emb_dim": 256, "gen_emb_dim": 768, "text_emb_layers": [-1], "text_fc_mode": "gill_mapper",
        "ret_text_fc_mode": "linear", "num_tokens": 8, "num_clip_tokens": 77, "share_ret_gen": True}))
    out = convert_original(original, tmp_path / "out", text_config=text_config, vision_config=vision_config,
                           tokenizer=opt_like_tokenizer(tmp_path / "tok"), image_processor=tiny_image_processor(),
                           dtype=torch.bfloat16)
    weights = load_file(out / "gill_adapter.safetensors")
    assert sum(t.numel() for t in weights.values()) == 50_096_385
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    size_mb = (out / "gill_adapter.safetensors").stat().st_size / 1e6
    assert 99 < size_mb < 101
    assert json.loads((out / "config.json").read_text())["backbone_references"] == {
        "text_model": "facebook/opt-6.7b", "vision_model": "openai/clip-vit-large-patch14"}


def _release_shape(name: str, shape: tuple) -> tuple:
    """The fixture's shapes at the release's sizes (retrieval dim 256, CLIP ViT-L width 1024)."""
    release = {
        "model.visual_embeddings.weight": (16384, 1024),
        "model.visual_fc.weight": (256, 1024),
        "model.visual_fc.bias": (256,),
        "model.ret_text_hidden_fcs.0.model.weight": (256, 4096),
        "model.ret_text_hidden_fcs.0.model.bias": (256,),
    }
    return release.get(name, shape)


def test_command_line_conversion(fixture_paths, tmp_path):
    from gill_hf.cli import main

    main(["convert-original", fixture_paths["gill_ckpt"], str(tmp_path / "out"), "--text-model", fixture_paths["opt"],
          "--vision-model", fixture_paths["clip"], "--dtype", "bfloat16"])
    weights = load_file(tmp_path / "out" / "gill_adapter.safetensors")
    assert weights["img_embeddings"].dtype == torch.bfloat16
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "gill_adapter.safetensors", "gill_manifest.json", "processor_config.json", "retrieval_index",
        "tokenizer.json", "tokenizer_config.json"]
