"""Nothing lost: the manifest save primitive under user files, interrupted saves, kill -9 loops and
altered files (model, retrieval index, pipeline). Budget: ~60 s on 2 cores (3 kills per kind;
`GILL_HF_KILL_LOOPS=20` for the full run)."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import diffusers
import pytest
import torch
import transformers

from gill_hf import GillForConditionalGeneration, GillRetrievalIndex
from gill_hf.modeling import manifest as manifest_module
from gill_hf.modeling.manifest import MANIFEST_NAME, ManifestError, read_manifest
from tiny_models import tiny_gill

KILLS = int(os.environ.get("GILL_HF_KILL_LOOPS", "3"))


def _digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_files(folder):
    """A user's notes, a processor-like file saved first, an index folder and a Trainer checkpoint."""
    (folder / "notes.txt").write_text("my experiment notes")
    (folder / "tokenizer_config.json").write_text('{"saved": "first"}')
    GillRetrievalIndex.from_embeddings(torch.randn(4, 16), references=list("abcd")).save_pretrained(folder / "retrieval_index")
    (folder / "checkpoint-100").mkdir()
    (folder / "checkpoint-100" / "optimizer.pt").write_bytes(b"\x00" * 64)
    return {name: data for name, data in _snapshot(folder).items()}


def test_model_saves_touch_only_their_own_files(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    user = _user_files(folder)
    model = tiny_gill("opt", seed=1)
    model.save_pretrained(folder)  # full form into a folder full of other things
    after = _snapshot(folder)
    assert {k: after[k] for k in user} == user
    assert _digest(GillForConditionalGeneration.from_pretrained(folder)) == _digest(model)

    # Another form replaces the previous checkpoint's files (they were its own), nothing else.
    model.config.backbone_references = {"text_model": "x/lm", "vision_model": "x/vision"}
    GillForConditionalGeneration.save_pretrained(model, folder, form="adapter")
    names = set(_snapshot(folder))
    assert "model.safetensors" not in names and "gill_adapter.safetensors" in names
    assert {k: _snapshot(folder)[k] for k in user} == user
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "no staging or backup folder remains"


def test_a_stale_file_of_an_older_save_is_not_part_of_the_checkpoint(tmp_path):
    """A folder written without manifests holds an adapter file; a full save beside it is what loads."""
    model = tiny_gill("opt", seed=2)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "gill_adapter.safetensors").write_bytes(b"an adapter from another tool")
    model.save_pretrained(folder)
    assert (folder / "gill_adapter.safetensors").read_bytes() == b"an adapter from another tool"
    assert _digest(GillForConditionalGeneration.from_pretrained(folder)) == _digest(model)


def test_train_decision_into_its_own_model_folder_keeps_the_index(tmp_path):
    from test_decision import checkpoint, labelled_prompts

    from gill_hf.cli import main

    folder = checkpoint(tmp_path / "m")
    GillRetrievalIndex.from_embeddings(torch.randn(4, 16), references=list("abcd")).save_pretrained(folder / "retrieval_index")
    index_files = _snapshot(folder / "retrieval_index")
    main(["train-decision", "--model_name_or_path", str(folder), "--prompts", str(labelled_prompts(tmp_path / "p.tsv")),
          "--output_dir", str(folder), "--steps", "5"])
    assert _snapshot(folder / "retrieval_index") == index_files
    assert GillForConditionalGeneration.from_pretrained(folder).decision_head is not None


@pytest.mark.parametrize("where", ["before_commit", "between_commit_and_renames"])
def test_an_interrupted_save_leaves_the_old_version_or_is_completed_on_load(tmp_path, monkeypatch, where):
    old, new = tiny_gill("opt", seed=4), tiny_gill("opt", seed=5)
    folder = tmp_path / "m"
    old.save_pretrained(folder)
    if where == "before_commit":
        monkeypatch.setattr(manifest_module, "_write_manifest", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        monkeypatch.setattr(manifest_module, "complete_pending", _complete_only_on_load())
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    expected = old if where == "before_commit" else new
    assert _digest(GillForConditionalGeneration.from_pretrained(folder)) == _digest(expected)
    assert (read_manifest(folder) or {}).get("pending") is None
    new.save_pretrained(folder)  # the next save cleans whatever the interrupted one left
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "gill_manifest.json", "model.safetensors"]


def _complete_only_on_load():
    real = manifest_module.complete_pending
    calls = []

    def fake(folder, manifest=None):
        calls.append(1)
        if manifest is not None and manifest.get("pending") and len(calls) > 1:
            raise KeyboardInterrupt("killed between the commit and the renames")
        return real(folder, manifest)

    return fake


def test_altered_weights_are_refused_naming_the_file(tmp_path):
    model = tiny_gill("opt", seed=6)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one bit flip inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.safetensors.*sha256"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "m")
    weights.write_bytes(bytes(data[:-100]))
    with pytest.raises(ManifestError, match="model.safetensors.*bytes"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_a_hostile_manifest_cannot_reach_outside_its_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (folder / MANIFEST_NAME).write_text(json.dumps({
        "format": "gill-manifest/1", "files": {},
        "pending": {"staging": ".gill-staging-1-0123456789abcdef", "remove": ["../victim.txt"]}}))
    with pytest.raises(ManifestError, match="outside its folder"):
        GillForConditionalGeneration.from_pretrained(folder)
    assert victim.read_text() == "keep me"


def test_a_save_clears_dead_processes_leftovers_but_not_this_process_work_in_progress(tmp_path):
    """Another thread of this process may be writing into its staging folder or manifest temporary
    (a save, or a load completing a pending save): a save removes only those of processes that are gone."""
    index = GillRetrievalIndex.from_embeddings(torch.randn(20, 8), references=[f"{i}.png" for i in range(20)])
    folder = tmp_path / "i"
    index.save_pretrained(folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = {pid: [folder / f".gill-staging-{pid}-{'0' * 16}", folder / f".{MANIFEST_NAME}.{pid}-{'1' * 16}"]
                 for pid in (os.getpid(), dead.pid)}
    for staging, temporary in leftovers.values():
        staging.mkdir()
        (staging / "index.safetensors").write_bytes(b"being written")
        temporary.write_text("{}")
    index.save_pretrained(folder)
    assert all(path.exists() for path in leftovers[os.getpid()])
    assert not any(path.exists() for path in leftovers[dead.pid])
    assert torch.equal(GillRetrievalIndex.from_pretrained(folder).embeddings, index.embeddings)


# ----- kill -9 loops ---------------------------------------------------------------------------------


def _kill_loop(tmp_path, save_a, save_b, load_digest, digests, kills):
    """Forks a child that saves versions A and B alternately into one folder forever, kills it with
    SIGKILL at random moments, and checks after each kill that the folder loads as exactly A or B and
    that the user's files are byte-identical."""
    folder = tmp_path / "target"
    folder.mkdir()
    (folder / "notes.txt").write_text("user notes")
    save_a(folder)
    rng = random.Random(0)
    seen = set()
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # child: save forever
            try:
                # A lock the child holds when killed would be held forever in the parent too (tqdm's
                # write lock is shared across fork): the child draws no progress bar.
                transformers.utils.logging.disable_progress_bar()
                diffusers.utils.logging.disable_progress_bar()
                torch.set_num_threads(1)
                while True:
                    save_b(folder)
                    save_a(folder)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        digest = load_digest(folder)
        assert digest in digests, "the folder loaded as neither the old nor the new version"
        seen.add(digest)
        assert (folder / "notes.txt").read_text() == "user notes"
    save_a(folder)  # a save after the kills cleans every abandoned staging folder
    assert not [p for p in folder.iterdir() if p.name.startswith(".gill")]
    return seen


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_loop_model(tmp_path):
    a, b = tiny_gill("opt", seed=7), tiny_gill("opt", seed=8)
    digests = {_digest(a), _digest(b)}
    _kill_loop(tmp_path, a.save_pretrained, b.save_pretrained,
               lambda f: _digest(GillForConditionalGeneration.from_pretrained(f)), digests, KILLS)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_loop_retrieval_index(tmp_path):
    a = GillRetrievalIndex.from_embeddings(torch.randn(300, 16), references=[f"a{i}.png" for i in range(300)])
    b = GillRetrievalIndex.from_embeddings(torch.randn(300, 16), references=[f"b{i}.png" for i in range(300)])

    def index_digest(index):
        return hashlib.sha256(index.embeddings.float().numpy().tobytes() + "".join(index.references).encode()).hexdigest()

    _kill_loop(tmp_path, a.save_pretrained, b.save_pretrained,
               lambda f: index_digest(GillRetrievalIndex.from_pretrained(f, verify=True)), {index_digest(a), index_digest(b)}, KILLS)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_loop_pipeline(tmp_path):
    from test_pipeline import tiny_pipeline

    from gill_hf import GillPipeline

    a = tiny_pipeline(tmp_path / "a", seed=1)
    b = tiny_pipeline(tmp_path / "b", seed=2)
    with torch.no_grad():
        for p in b.unet.parameters():
            p.add_(1.0)  # a mixture of B's gill_model and A's UNet would show

    def pipe_digest(pipe):
        return (_digest(pipe.gill_model), _digest(pipe.unet))

    _kill_loop(tmp_path, a.save_pretrained, b.save_pretrained, lambda f: pipe_digest(GillPipeline.from_pretrained(f)),
               {pipe_digest(a), pipe_digest(b)}, KILLS)
