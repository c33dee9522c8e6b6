"""GillTrainer: logged losses, checkpoints without backbone tensors, exact resume, weight decay
modes, [IMG] row renormalisation, eval metrics, and the contrastive loss across two processes."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tiny_models import IMG_TOKEN_IDS, tiny_gill, training_batch
from torch_threads import torch_threads
from transformers import TrainerCallback

from gill_hf.modeling.checkpointing import gill_state_dict
from gill_hf.training import LOSS_KEYS, GillTrainer, GillTrainingArguments, reference_lr_lambda


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores: a second intra-op thread makes tiny matmuls wait (measured 30 ms -> 2 s a step).
    with torch_threads(1):
        yield



class ListDataset(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def args(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
        per_device_eval_batch_size=4, max_steps=1, logging_steps=1, save_strategy="no", seed=0,
        warmup_steps=0, lr_step_size=0, lr_scheduler_type="constant", concat_captions_prob=0.0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    fields.update(overrides)
    return GillTrainingArguments(**fields)


# ----- the logged loss is the formula --------------------------------------------------------------


def explicit_total_loss(model, batch):
    """caption CE + text CE + symmetric InfoNCE + mean per-token L2 distance, by loops over examples
    and tokens (never the model's batched helpers)."""
    lm = model.language_model
    in_rows, out_rows = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    width = model.logits_width

    def logits_at(h):
        full = torch.full((width,), float("-inf"))
        full[: out_rows.shape[0]] = out_rows @ h
        for slot, token in enumerate(IMG_TOKEN_IDS):
            full[token] = model.img_output_rows[slot] @ h
        return full

    def nll(h, target):
        return -torch.log_softmax(logits_at(h), dim=0)[target]

    cap, txt, img_vecs, txt_vecs, dists = [], [], [], [], []
    for i, ids in enumerate(batch["input_ids"].tolist()):
        k = ids.index(IMG_TOKEN_IDS[0])
        tokens = torch.stack([model.img_embeddings[IMG_TOKEN_IDS.index(t)] if t in IMG_TOKEN_IDS else in_rows[t] for t in ids])
        pooled = model.vision_model(pixel_values=batch["pixel_values"][i : i + 1]).pooler_output[0]
        prefix = model.visual_projection(pooled).reshape(model.config.num_visual_tokens, -1)
        n_vis = prefix.shape[0]
        hidden = lm(inputs_embeds=torch.cat([prefix, tokens])[None], output_hidden_states=True).hidden_states[-1][0]
        cap += [nll(hidden[n_vis + t - 1], ids[t]) for t in range(k)]
        hidden = lm(inputs_embeds=tokens[None], output_hidden_states=True).hidden_states[-1][0]
        txt += [nll(hidden[t - 1], ids[t]) for t in range(1, k + 1)]
        img_vecs.append(torch.nn.functional.normalize(model.image_retrieval_projection(pooled), dim=0))
        txt_vecs.append(torch.nn.functional.normalize(model.text_retrieval_projection(hidden[k]), dim=0))
        prompt = model.mapper(hidden[k : k + 8][None], model.img_embeddings[None])[0]
        dists += [float((prompt[p] - batch["gen_targets"][i, p]).norm()) for p in range(prompt.shape[0])]
    n, scale = len(img_vecs), math.exp(model.logit_scale.item())
    sim = [[scale * float(img_vecs[a] @ txt_vecs[b]) for b in range(n)] for a in range(n)]
    i2t = sum(math.log(sum(math.exp(s) for s in sim[a])) - sim[a][a] for a in range(n)) / n
    t2i = sum(math.log(sum(math.exp(sim[a][b]) for a in range(n))) - sim[b][b] for b in range(n)) / n
    return float(sum(cap) / len(cap)) + float(sum(txt) / len(txt)) + (i2t + t2i) / 2 + sum(dists) / len(dists)


def test_logged_total_loss_is_the_formula_recomputed(tmp_path):
    model = tiny_gill("opt", seed=3)
    batch = training_batch(batch=4, seed=4)
    with torch.no_grad():
        expected = explicit_total_loss(model, batch)
    trainer = GillTrainer(model=model, args=args(tmp_path), train_dataset=ListDataset(batch), data_collator=stack)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert log["loss"] == pytest.approx(expected, abs=1e-5)
    assert set(LOSS_KEYS) <= set(log)
    assert sum(log[k] for k in LOSS_KEYS) == pytest.approx(log["loss"], abs=1e-5)


def test_components_average_over_the_same_window_as_the_loss(tmp_path):
    """Two optimizer steps of two accumulated micro-batches per log: every component must be
    averaged over the same four micro-batches as Trainer's `loss` (their sum equals it)."""
    batch = training_batch(batch=8, seed=6)
    trainer = GillTrainer(
        model=tiny_gill("opt", seed=1), train_dataset=ListDataset(batch), data_collator=stack,
        args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, logging_steps=2),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    assert len(logs) == 2
    for log in logs:
        assert sum(log[k] for k in LOSS_KEYS) == pytest.approx(log["loss"], rel=1e-6)


# ----- checkpoints and exact resume ----------------------------------------------------------------


class StopAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill after the checkpoint")


def resumable_run(tmp_path, name, callbacks=(), resume=None):
    model = tiny_gill("llama", seed=7)  # untied: [IMG] output rows train too
    trainer = GillTrainer(
        model=model, train_dataset=ListDataset(training_batch(batch=8, seed=8)), data_collator=stack,
        callbacks=list(callbacks),
        args=args(tmp_path / name, per_device_train_batch_size=2, max_steps=6, save_strategy="steps", save_steps=3,
                  learning_rate=1e-2, warmup_steps=2, lr_step_size=2, lr_step_gamma=0.5, concat_captions_prob=0.5,
                  weight_decay=0.1),
    )
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_kill_and_resume_is_bitwise_equal_and_checkpoints_hold_no_backbone(tmp_path):
    uninterrupted = resumable_run(tmp_path, "a")
    with pytest.raises(KeyboardInterrupt):
        resumable_run(tmp_path, "b", callbacks=[StopAfterSave(3)])
    checkpoint = tmp_path / "b" / "checkpoint-3"
    resumed = resumable_run(tmp_path, "c", resume=str(checkpoint))

    final, again = gill_state_dict(uninterrupted), gill_state_dict(resumed)
    assert set(final) == set(again)
    for name in final:
        assert torch.equal(final[name], again[name]), name
    start = gill_state_dict(tiny_gill("llama", seed=7))
    assert not torch.equal(start["mapper.queries"], final["mapper.queries"])  # it did train

    files = set(os.listdir(checkpoint))
    assert {"gill_adapter.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "config.json"} <= files
    assert any(f.startswith("rng_state") for f in files)
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    keys = set(load_file(checkpoint / "gill_adapter.safetensors"))
    assert keys and not any(k.startswith(("language_model.", "vision_model.")) for k in keys)
    assert "img_embeddings" in keys and "mapper.queries" in keys


# ----- optimizer options ---------------------------------------------------------------------------


def test_weight_decay_modes(tmp_path):
    batch = ListDataset(training_batch(batch=4))
    groups = {}
    for mode in ("reference", "standard"):
        trainer = GillTrainer(model=tiny_gill("opt"), args=args(tmp_path, weight_decay_mode=mode), train_dataset=batch, data_collator=stack)
        trainer.create_optimizer()
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        groups[mode] = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert groups[mode] <= trainable
    trainable = {n for n, p in tiny_gill("opt").named_parameters() if p.requires_grad}
    assert groups["reference"] == trainable  # biases, norms, logit_scale and [IMG] rows included
    assert "logit_scale" in groups["reference"] and "img_embeddings" in groups["reference"]
    assert "visual_projection.bias" not in groups["standard"] and "visual_projection.weight" in groups["standard"]


def test_reference_schedule_warms_up_then_steps():
    factor = reference_lr_lambda(warmup_steps=4, step_size=10, gamma=0.1)
    assert [factor(s) for s in (0, 2, 4, 13)] == [0.0, 0.5, 1.0, 1.0]
    assert factor(14) == pytest.approx(0.1) and factor(24) == pytest.approx(0.01)


@pytest.mark.parametrize("rescale", [True, False])
def test_img_rows_are_renormalised_after_each_step(tmp_path, rescale):
    model = tiny_gill("llama", seed=2)
    trainer = GillTrainer(model=model, args=args(tmp_path, learning_rate=0.5, rescale_img_rows=rescale),
                          train_dataset=ListDataset(training_batch(batch=4)), data_collator=stack)
    trainer.train()
    lm_rows = model.language_model.get_input_embeddings().weight
    keep = [r for r in range(lm_rows.shape[0]) if r not in IMG_TOKEN_IDS]  # rows GILL's own rows override
    target = lm_rows[keep].norm(dim=-1).mean()
    norms = model.img_embeddings.detach().norm(dim=-1)
    assert torch.allclose(norms, target.expand_as(norms), atol=1e-5) == rescale


def test_evaluation_logs_components_and_retrieval_metrics(tmp_path):
    batch = ListDataset(training_batch(batch=6, seed=9))
    trainer = GillTrainer(model=tiny_gill("opt"), args=args(tmp_path, per_device_eval_batch_size=4),
                          train_dataset=batch, eval_dataset=batch, data_collator=stack)
    metrics = trainer.evaluate()
    for key in (*LOSS_KEYS, "t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "gen_l2", "loss"):
        assert f"eval_{key}" in metrics, key
    assert metrics["eval_t2i_r5"] >= metrics["eval_t2i_r1"]
    assert metrics["eval_gen_l2"] == pytest.approx(metrics["eval_gen_loss"], rel=1e-5)
    assert any("eval_caption_loss" in entry for entry in trainer.state.log_history)


# ----- two processes: the contrastive loss sees the global batch ----------------------------------


def _two_process_worker(rank, world, port, output_dir, results, gather="reference"):
    """One process of a two-process CPU run (gloo): GillTrainer under DDP, then a bare forward."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    batch = training_batch(batch=6, seed=11)
    trainer = GillTrainer(model=tiny_gill("opt", seed=5), train_dataset=ListDataset(batch), data_collator=stack,
                          args=args(output_dir, per_device_train_batch_size=3, contrastive_gather=gather))
    trainer.train()  # each process trains on its 3 examples; the model gathers the other 3 as negatives
    model = tiny_gill("opt", seed=5, contrastive_gather=gather)
    out = model(**{k: v.chunk(world)[rank] for k, v in batch.items()})
    out.contrastive_loss.backward()
    results[rank] = (trainer.state.log_history[0], out.contrastive_loss.item(), model.text_retrieval_projection.weight.grad.clone())
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("gather", ["reference", "autograd"])
def test_two_processes_contrastive_loss_equals_single_process_on_the_whole_batch(tmp_path, gather):
    import socket

    batch = training_batch(batch=6, seed=11)
    model = tiny_gill("opt", seed=5)
    out = model(**batch)
    out.contrastive_loss.backward()
    single, single_grad = out.contrastive_loss.item(), model.text_retrieval_projection.weight.grad
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_two_process_worker, args=(2, port, str(tmp_path), results, gather), nprocs=2, join=True,
                       start_method="spawn")
    for rank in (0, 1):
        log, bare, _ = results[rank]
        assert log["contrastive_loss"] == pytest.approx(single, abs=1e-6)  # GillTrainer under DDP, logged
        assert bare == pytest.approx(single, abs=1e-6)
    if gather == "reference":
        # Each process keeps the gradient of its own examples: the two parts add up to the whole
        # (DDP's averaging then scales it by 1/2, as in the reference's loop).
        assert torch.allclose(results[0][2] + results[1][2], single_grad, atol=1e-6)
    else:
        # Gradients flow back through the gather (each process's loss reads both halves), so DDP's
        # average of the two processes' gradients is the single-process gradient on the whole batch.
        assert torch.allclose((results[0][2] + results[1][2]) / 2, single_grad, atol=1e-6)


def test_retrieval_recall_metric_module_and_ties():
    import evaluate

    from gill_hf.metrics import metric_path, retrieval_metrics

    metric = evaluate.load(metric_path("retrieval_recall"))
    text = [[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]
    image = [[1.0, 0.1], [0.6, 0.8], [0.1, 1.0]]
    result = metric.compute(text_embeds=text, image_embeds=image)
    # text 0 -> image 0 (right); text 1 -> image 2 (wrong); text 2 -> image 1 (wrong)
    assert result["t2i_r1"] == pytest.approx(1 / 3) and result["t2i_r5"] == 1.0
    assert result == retrieval_metrics(torch.tensor(text), torch.tensor(image))
    l2 = evaluate.load(metric_path("generation_l2"))
    assert l2.compute(predictions=[[[3.0, 4.0], [0.0, 1.0]]], references=[[[0.0, 0.0], [0.0, 0.0]]])["gen_l2"] == 3.0
    constant = retrieval_metrics(torch.ones(4, 3), torch.ones(4, 3))
    assert constant["t2i_r1"] == 0.0 and constant["i2t_r5"] == 1.0  # ties rank the right image last


class FolderApi:
    """The two HfApi calls a push makes, backed by a folder."""

    def __init__(self, root):
        self.root, self.messages = root, []

    def create_repo(self, repo_id, exist_ok=False, private=None, repo_type=None):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, repo_id, folder_path, repo_type=None, revision=None, commit_message=None):
        import shutil

        self.messages.append(commit_message)
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)


def test_best_checkpoint_by_text_to_image_r1_and_push(tmp_path):
    from gill_hf.train_recipe import push_trained_model

    data = ListDataset(training_batch(batch=8, seed=12))
    model = tiny_gill("opt", seed=4)
    trainer = GillTrainer(model=model, train_dataset=data, eval_dataset=data, data_collator=stack, args=args(
        tmp_path / "run", max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="t2i_r1", learning_rate=1e-2, per_device_eval_batch_size=8))
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_t2i_r1" in h]
    best = max(evals, key=lambda h: h["eval_t2i_r1"])  # the first of equals wins, as Trainer's strict comparison
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    saved = load_file(os.path.join(trainer.state.best_model_checkpoint, "gill_adapter.safetensors"))
    current = gill_state_dict(model)
    assert all(torch.equal(saved[k], current[k]) for k in saved)

    api = FolderApi(tmp_path / "hub")
    push_trained_model(trainer, repo_id="org/tiny-gill", api=api, data="`cc3m_train.tsv` (8 examples)")
    pushed = set(os.listdir(tmp_path / "hub" / "org" / "tiny-gill"))
    assert {"config.json", "README.md"} <= pushed  # full form: these backbones have no references
    assert api.messages and "4 steps" in api.messages[0] and "eval_t2i_r1" in api.messages[0]
    # The card is filled from the run: its data, steps, last losses and evaluation metrics.
    card = (tmp_path / "hub" / "org" / "tiny-gill" / "README.md").read_text()
    assert "- data: `cc3m_train.tsv` (8 examples)" in card and "- steps: 4" in card
    assert f"- eval_t2i_r1: {evals[-1]['eval_t2i_r1']:.4g}" in card
    last_loss = [h for h in trainer.state.log_history if "contrastive_loss" in h][-1]["contrastive_loss"]
    assert f"- train_contrastive_loss: {last_loss:.4g}" in card
