"""Nothing tampered, nothing silently wrong: references, non-finite numbers, index files, concurrent
readers, config values, literal GILL tokens, pipeline arguments, image bounds, bad rows, raw
exceptions and the CLI's error policy. Budget: ~25 s on 2 cores."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from test_cli import synthetic_cc3m, tiny_checkpoint
from test_data import make_cc3m, processor
from test_pipeline import FAST, tiny_pipeline, tiny_processor
from test_training import ListDataset, args, one_thread  # noqa: F401 (autouse: one torch thread)
from tiny_models import IMG_TOKEN_IDS, gill_config, tiny_gill, training_batch

from gill_hf import GillForConditionalGeneration, GillRetrievalIndex
from gill_hf.backbones import resolve_backbone
from gill_hf.data import GillDataCollator, load_cc3m_dataset
from gill_hf.decision import load_labelled_prompts
from gill_hf.training import GillTrainer

# ----- 8. references and configs that would load something else ---------------------------------------


def test_a_repo_id_reference_never_loads_a_local_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "lm").mkdir(parents=True)
    with pytest.raises(ValueError, match="local path.*would be loaded instead"):
        resolve_backbone({"repo_id": "org/lm"})
    for bad in ("/abs/path", "./rel", "a/b/c"):
        with pytest.raises(ValueError, match="not a hub repo id"):
            resolve_backbone({"repo_id": bad})
    assert resolve_backbone({"repo_id": "org/other", "revision": "v1"}) == ("org/other", {"revision": "v1"})


def test_a_config_without_backbone_configs_is_refused(tmp_path):
    tiny_gill("opt").save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["text_config"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "gill_manifest.json").unlink()
    with pytest.raises(ValueError, match="config.json.*lacks \\['text_config'\\]"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "m")


# ----- 9. non-finite targets and losses -------------------------------------------------------------------


def test_non_finite_or_mis_shaped_targets_cost_their_row(tmp_path):
    proc = processor(tmp_path)
    good = np.zeros((6, 20), np.float32)
    examples = [
        {"caption": "a dog", "image": np.zeros((8, 8, 3), np.uint8), "gen_targets": good},
        {"caption": "a cat", "image": np.zeros((8, 8, 3), np.uint8), "gen_targets": np.full((6, 20), np.inf, np.float16)},
        {"caption": "a car", "image": np.zeros((8, 8, 3), np.uint8), "gen_targets": np.full((6, 20), np.nan)},
        {"caption": "a cow", "image": np.zeros((8, 8, 3), np.uint8), "gen_targets": np.zeros((6, 21), np.float32)},
        {"caption": "a pig", "image": np.zeros((8, 8, 3), np.uint8), "gen_targets": good},
    ]
    collator = GillDataCollator(proc, max_length=16, num_clip_tokens=6, gen_emb_dim=20)
    batch = collator(examples)
    assert batch["gen_targets"].shape == (2, 6, 20) and torch.isfinite(batch["gen_targets"]).all()
    assert collator.skipped == {"bad_target": 3}


def test_a_non_finite_loss_stops_training_with_an_error(tmp_path):
    model = tiny_gill("opt", seed=0).train()
    with torch.no_grad():
        model.logit_scale.fill_(float("inf"))
    batch = training_batch(batch=4)
    trainer = GillTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=ListDataset(batch),
                          data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    with pytest.raises(FloatingPointError, match="Non-finite training loss at step 0"):
        trainer.train()


# ----- 10. retrieval index numbers and files -----------------------------------------------------------------


def test_index_refuses_non_finite_rows_integer_storage_and_nan_queries(tmp_path):
    bad = torch.randn(5, 16)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        GillRetrievalIndex.from_embeddings(bad, references=list("abcde"))
    with pytest.raises(TypeError, match="dtype"):
        GillRetrievalIndex.from_embeddings(torch.ones(5, 16, dtype=torch.int8), references=list("abcde"))
    index = GillRetrievalIndex.from_embeddings(torch.randn(5, 16), references=list("abcde"))
    with pytest.raises(ValueError, match="`query`"):
        index.search(torch.full((16,), float("nan")))
    # A file written by another tool with a NaN and an inf row: the first search refuses it.
    index.save_pretrained(tmp_path / "i")
    rows = torch.randn(5, 16)
    rows[1, 0], rows[4, 4] = float("nan"), float("inf")
    save_file({"embeddings": rows}, tmp_path / "i" / "embeddings.safetensors")
    (tmp_path / "i" / "gill_manifest.json").unlink()
    loaded = GillRetrievalIndex.from_pretrained(tmp_path / "i")
    with pytest.raises(ValueError, match="row 1 holds NaN"):
        loaded.search(torch.randn(16))


def test_a_blank_line_in_references_is_an_error_not_a_shift(tmp_path):
    GillRetrievalIndex.from_embeddings(torch.randn(3, 16), references=["a.png", "b.png", "c.png"]).save_pretrained(tmp_path / "i")
    (tmp_path / "i" / "references.jsonl").write_text('{"path": "a.png"}\n\n{"path": "b.png"}\n')
    (tmp_path / "i" / "gill_manifest.json").unlink()
    with pytest.raises(ValueError, match="references.jsonl.* line 2"):
        GillRetrievalIndex.from_pretrained(tmp_path / "i").references


def test_lying_embeddings_headers_name_the_file(tmp_path):
    GillRetrievalIndex.from_embeddings(torch.randn(3, 16), references=list("abc")).save_pretrained(tmp_path / "i")
    path = tmp_path / "i" / "embeddings.safetensors"
    (tmp_path / "i" / "gill_manifest.json").unlink()
    header = {"embeddings": {"dtype": "F32", "shape": [10**12, 16], "data_offsets": [0, 192]}}
    for lie in (header, {"embeddings": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, {"other": {}}, [1, 2]):
        raw = json.dumps(lie).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\x00" * 192)
        with pytest.raises(ValueError, match="embeddings.safetensors"):
            GillRetrievalIndex.from_pretrained(tmp_path / "i")
    path.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header"):
        GillRetrievalIndex.from_pretrained(tmp_path / "i")


def test_a_missing_local_index_folder_is_not_taken_for_a_hub_repo(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        GillRetrievalIndex.from_pretrained(str(tmp_path / "gone" / "index"))


# ----- 11. a reader sees one version -----------------------------------------------------------------------


def test_a_loaded_index_keeps_its_version_while_the_folder_is_resaved(tmp_path):
    a = GillRetrievalIndex.from_embeddings(torch.randn(50, 16), references=[f"a{i}.png" for i in range(50)])
    b = GillRetrievalIndex.from_embeddings(torch.randn(50, 16), references=[f"b{i}.png" for i in range(50)])
    a.save_pretrained(tmp_path / "i")
    reader = GillRetrievalIndex.from_pretrained(tmp_path / "i")
    b.save_pretrained(tmp_path / "i")  # references are parsed lazily, after this re-save
    assert reader.references == a.references
    assert torch.equal(reader.embeddings, a.embeddings)
    reader.search(torch.randn(16))  # its first full scan verifies the version it holds


def test_concurrent_reloads_never_pair_embeddings_with_other_references(tmp_path):
    versions = [GillRetrievalIndex.from_embeddings(torch.randn(200, 16), references=[f"{v}{i}.png" for i in range(200)])
                for v in "ab"]
    versions[0].save_pretrained(tmp_path / "i")
    stop = threading.Event()

    def writer():
        k = 0
        while not stop.is_set():
            versions[k % 2].save_pretrained(tmp_path / "i")
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(30):
            loaded = GillRetrievalIndex.from_pretrained(tmp_path / "i")
            version = 0 if loaded.references[0].startswith("a") else 1
            assert torch.equal(loaded.embeddings, versions[version].embeddings)
            assert all(r.startswith("ab"[version]) for r in loaded.references)
    finally:
        stop.set()
        thread.join()


# ----- 12. config values and literal GILL tokens ----------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    (dict(img_token_ids=[-1, *IMG_TOKEN_IDS[1:]]), "img_token_ids"),
    (dict(img_token_ids=[10**9, *IMG_TOKEN_IDS[1:]]), "img_token_ids"),
    (dict(image_token_id=IMG_TOKEN_IDS[0]), "image_token_id"),
    (dict(text_emb_layers=[7]), "text_emb_layers"),
    (dict(text_emb_layers=[-9]), "text_emb_layers"),
])
def test_config_values_that_would_break_the_model_are_refused(overrides, field):
    with pytest.raises(ValueError, match=field):
        gill_config("opt", **overrides)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_literal_gill_token_strings_tokenize_as_plain_text(tmp_path, kind):
    proc = tiny_processor(tmp_path, kind)
    gill_ids = {proc.image_token_id, *proc.img_token_ids}
    text = "draw [IMG0] and <|image|> here"
    ids = proc(text=text)["input_ids"][0].tolist()
    assert not gill_ids & set(ids)
    assert ids == proc.tokenizer(text, split_special_tokens=True)["input_ids"]
    rows = proc.build_training_inputs(["a caption with [IMG3] inside"], max_length=32)["input_ids"][0].tolist()
    assert rows.count(proc.img_token_ids[0]) == 1 and sum(i in gill_ids for i in rows) == len(proc.img_token_ids)
    with pytest.raises(ValueError, match="`text` is not valid text"):
        proc(text="a lone \ud800 surrogate")


# ----- 13. pipeline arguments ---------------------------------------------------------------------------------------


def test_pipeline_arguments_are_checked(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    call = dict(prompt="a dog", max_new_tokens=8, force_image=True, **FAST)
    for key, value, error, match in [
        ("guidance_scale", float("nan"), ValueError, "guidance_scale"),
        ("guidance_scale", float("inf"), ValueError, "guidance_scale"),
        ("gen_scale_factor", float("inf"), ValueError, "gen_scale_factor"),
        ("ret_scale_factor", 1e30, ValueError, "ret_scale_factor"),
        ("temperature", float("nan"), ValueError, "temperature"),
        ("force_image", "no", TypeError, "force_image"),
        ("do_sample", 1, TypeError, "do_sample"),
        ("height", "16", TypeError, "height"),
        ("latents", torch.full((1, 4, 8, 8), float("nan")), ValueError, "latents"),
    ]:
        with pytest.raises(error, match=match):
            pipe(**{**call, key: value})

    def poison(pipeline, step, timestep, kwargs):
        return {"latents": kwargs["latents"] * float("nan")}

    with pytest.raises(ValueError, match="callback_on_step_end"):
        pipe(**call, callback_on_step_end=poison)


# ----- 14. images that would exhaust memory; odd image objects ----------------------------------------------------


def test_extreme_images_are_refused_naming_the_argument(tmp_path):
    proc = tiny_processor(tmp_path)
    for image in (PIL.Image.new("RGB", (1, 20000)), np.zeros((1, 30, 3), np.uint8), torch.zeros(3, 2, 60),
                  PIL.Image.new("L", (8000, 8000))):
        with pytest.raises(ValueError, match="images\\[0\\]"):
            proc(text="<image> what?", images=[image])
    with pytest.raises(ValueError, match="meta device"):
        proc(text="<image>", images=[torch.zeros(3, 8, 8, device="meta")])
    assert proc(text="<image>", images=[PIL.Image.new("La", (8, 8))])["pixel_values"].shape[0] == 1


# ----- 15. bad rows cost their row ----------------------------------------------------------------------------------


def test_bad_tsv_rows_are_counted_and_long_captions_train(tmp_path):
    tsv, images = make_cc3m(tmp_path, n=4)
    lines = tsv.read_text().splitlines()
    lines[2] = lines[2].replace("\t", " ")  # no tab
    lines[3] = ("very long caption " * 8000) + "\t" + lines[3].split("\t")[1]  # 144,000 characters
    tsv.write_text("\n".join(lines) + "\n")
    dataset = load_cc3m_dataset(tsv, images)
    assert len(dataset) == 3
    collator = GillDataCollator(processor(tmp_path), max_length=16, num_clip_tokens=6)
    batch = collator([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 16)


def test_decision_prompt_files_are_read_strictly(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text('text\tdecision\n"an unbalanced quote\tgenerate\nShow me a dog\tretrieve\n')
    texts, labels = load_labelled_prompts(tsv)
    assert texts == ['"an unbalanced quote', "Show me a dog"] and labels == [0, 1]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "a", "decision": "generate"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="p.jsonl.* line 2 must be a JSON object"):
        load_labelled_prompts(jsonl)


# ----- 16. raw exceptions become messages naming the file ---------------------------------------------------------


def test_damaged_full_form_weights_name_the_file(tmp_path):
    tiny_gill("opt").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "gill_manifest.json").unlink()
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors|cannot be read"):
        GillForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_a_truncated_png_costs_only_that_image_in_an_index_build(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:40])
    model = tiny_gill("opt")
    index = GillRetrievalIndex.build(model, folder, tiny_processor(tmp_path), batch_size=2)
    assert [os.path.basename(r) for r in index.references] == ["0.png", "2.png"] and len(index) == 2


# ----- 17. the CLI's user errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["train-decision", "--model_name_or_path", "/nonexistent/model", "--prompts", "p.tsv", "--output_dir", "o"], "nonexistent"),
    (["precompute-targets", "--sd_model", "x", "--output_dir", "o"], "exactly one data source"),
    (["world", "evaluate", "bogus"], "invalid choice"),
])
def test_cli_user_errors_print_one_line_and_exit_2(tmp_path, argv, message):
    result = subprocess.run([sys.executable, "-m", "gill_hf.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_an_eval_fraction_outside_its_range_is_a_user_error(tmp_path):
    from test_decision import checkpoint, labelled_prompts

    from gill_hf.cli import main

    folder = checkpoint(tmp_path / "m")
    with pytest.raises(SystemExit) as exit_info:
        main(["train-decision", "--model_name_or_path", str(folder), "--prompts", str(labelled_prompts(tmp_path / "p.tsv")),
              "--output_dir", str(tmp_path / "o"), "--eval_fraction", "1.5"])
    assert exit_info.value.code == 2


# ----- silently wrong runs and folders (the first-hour issue) ------------------------------------------


def test_training_without_generation_targets_is_an_error_unless_asked(tmp_path):
    from gill_hf.cli import main

    checkpoint = tiny_checkpoint(tmp_path / "model")
    tsv, images = synthetic_cc3m(tmp_path / "data")
    import shutil

    shutil.rmtree(images / "clip_embs")
    argv = ["train", "--model_name_or_path", str(checkpoint), "--train_tsv", str(tsv), "--image_dir", str(images),
            "--output_dir", str(tmp_path / "run"), "--use_cpu", "--report_to", "none", "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", "--disable_tqdm", "true"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    main(argv + ["--allow_missing_targets"])
    assert (tmp_path / "run" / "gill_adapter.safetensors").is_file()


def test_saved_folders_keep_normal_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    tiny_gill("opt").save_pretrained(tmp_path / "m")
    GillRetrievalIndex.from_embeddings(torch.randn(2, 16), references=["a", "b"]).save_pretrained(tmp_path / "i")
    for folder in (tmp_path / "m", tmp_path / "i"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
        assert (folder / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    # safetensors creates its files 0o600; saved weights are readable like every other file
    for weights in (tmp_path / "m" / "model.safetensors", tmp_path / "i" / "embeddings.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~umask, weights
