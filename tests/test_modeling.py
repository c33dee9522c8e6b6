"""GillForConditionalGeneration: parameters, freezing, losses (recomputed by explicit loops), token
ids and logits width, decoding."""

import math

import pytest
import torch
import torch.nn.functional as F

from gill_hf import GillConfig, GillForConditionalGeneration
from tiny_models import BOS_ID, IMAGE_TOKEN_ID, IMG_TOKEN_IDS, LM_ROWS, gill_config, tiny_gill, training_batch

KINDS = ["opt", "llama", "gpt2"]
GILL_HEADS = ("visual_projection.", "img_embeddings", "img_output_embeddings", "text_retrieval_projection.",
              "image_retrieval_projection.", "logit_scale", "mapper.")


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_parameters_are_exactly_the_gill_heads(kind):
    model = tiny_gill(kind, decision_head_type="hidden")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    heads = {name for name, _ in model.named_parameters() if name.startswith(GILL_HEADS)}
    assert trainable == heads
    assert not any(name.startswith("decision_head") for name in trainable)
    # Untied LMs get their own [IMG] output rows; tied ones share the input rows.
    assert ("img_output_embeddings" in trainable) == (kind == "llama")


@pytest.mark.parametrize("kind", KINDS)
def test_adamw_step_moves_every_head_and_no_backbone_tensor(kind):
    model = tiny_gill(kind).train()
    backbone = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("language_model.", "vision_model."))}
    heads = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**training_batch()).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name, before in backbone.items():
        assert torch.equal(before, after[name]), f"backbone tensor {name} changed"
    for name, before in heads.items():
        assert not torch.equal(before, after[name]), f"head tensor {name} did not move"
    # Frozen parts stay in eval mode (dropout off) under train().
    assert model.training and not model.language_model.training and not model.vision_model.training


def test_reference_size_parameter_count_on_meta_device():
    config = GillConfig(img_token_ids=list(range(50266, 50274)), image_token_id=50265, vocab_size=50274)
    with torch.device("meta"):
        model = GillForConditionalGeneration(config)
        with_decision = GillForConditionalGeneration(GillConfig(**{**config.to_dict(), "decision_head_type": "hidden"}))

    def head_count(m):
        return sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("language_model.", "vision_model.")))

    assert head_count(model) == 50_096_385
    assert head_count(with_decision) == 50_096_385 + 8_194
    assert model.logits_width == 50274


# ----- losses, recomputed by explicit loops -------------------------------------------------


def _explicit_logits(model, hidden):
    """Per position, per column: LM logit, GILL's own [IMG] row, or -inf where no row exists."""
    lm_head = model.language_model.get_output_embeddings().weight
    img_rows = model.img_output_rows
    width = model.logits_width
    rows = []
    for h in hidden:
        row = []
        for column in range(width):
            if column in IMG_TOKEN_IDS:
                row.append(torch.dot(h, img_rows[IMG_TOKEN_IDS.index(column)]))
            elif column < lm_head.shape[0]:
                row.append(torch.dot(h, lm_head[column]))
            else:
                row.append(torch.tensor(float("-inf")))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _nll(logits_row, target):
    return -(logits_row[target] - torch.logsumexp(logits_row, dim=0))


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_each_loss_component_matches_an_explicit_computation(kind):
    model = tiny_gill(kind, seed=1)
    batch = training_batch(batch=3, seed=2)
    with torch.no_grad():
        out = model(**batch)
        lm = model.language_model
        caption_terms, text_terms, img_states, pooled = [], [], [], []
        for i, ids in enumerate(batch["input_ids"].tolist()):
            start = ids.index(IMG_TOKEN_IDS[0])
            pool = model.vision_model(pixel_values=batch["pixel_values"][i : i + 1]).pooler_output[0]
            pooled.append(pool)
            prefix = model.visual_projection(pool).reshape(4, -1)
            token_rows = []
            for token in ids:
                if token in IMG_TOKEN_IDS:
                    token_rows.append(model.img_embeddings[IMG_TOKEN_IDS.index(token)])
                else:
                    token_rows.append(lm.get_input_embeddings().weight[token])
            tokens = torch.stack(token_rows)
            # Captioning pass: the visual prefix, then the row; BOS + caption are the targets.
            hidden = lm(inputs_embeds=torch.cat([prefix, tokens])[None], output_hidden_states=True).hidden_states[-1][0]
            logits = _explicit_logits(model, hidden)
            for t in range(start):
                caption_terms.append(_nll(logits[4 + t - 1], ids[t]))
            # Text pass: caption tokens after BOS and [IMG0] are targets; [IMG1..7] are not.
            hidden = lm(inputs_embeds=tokens[None], output_hidden_states=True).hidden_states[-1][0]
            logits = _explicit_logits(model, hidden)
            for t in range(1, start + 1):
                text_terms.append(_nll(logits[t - 1], ids[t]))
            img_states.append(hidden[start : start + 8])
        caption_loss = sum(caption_terms) / len(caption_terms)
        text_loss = sum(text_terms) / len(text_terms)

        n = len(pooled)
        image_vecs = [model.image_retrieval_projection(p) for p in pooled]
        text_vecs = [model.text_retrieval_projection(s[0]) for s in img_states]
        image_vecs = [v / v.norm() for v in image_vecs]
        text_vecs = [v / v.norm() for v in text_vecs]
        scale = math.exp(model.logit_scale.item())
        sim = [[scale * float(torch.dot(image_vecs[i], text_vecs[j])) for j in range(n)] for i in range(n)]
        image_to_text = sum(-(sim[i][i] - math.log(sum(math.exp(s) for s in sim[i]))) for i in range(n)) / n
        text_to_image = sum(
            -(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n)))) for j in range(n)
        ) / n
        contrastive = (image_to_text + text_to_image) / 2

        distances = []
        for i, states in enumerate(img_states):
            # The mapper reads each [IMG] state plus that token's input row.
            prompt = model.mapper(states[None], model.img_embeddings[None])[0]
            for position in range(prompt.shape[0]):
                diff = prompt[position] - batch["gen_targets"][i, position]
                distances.append(math.sqrt(float((diff * diff).sum())))
        gen_loss = sum(distances) / len(distances)

    assert torch.allclose(out.caption_loss, caption_loss, atol=1e-5)
    assert torch.allclose(out.text_loss, text_loss, atol=1e-5)
    assert out.contrastive_loss.item() == pytest.approx(contrastive, abs=1e-5)
    assert out.gen_loss.item() == pytest.approx(gen_loss, abs=1e-5)
    assert out.loss.item() == pytest.approx(caption_loss.item() + text_loss.item() + contrastive + gen_loss, abs=1e-4)


def test_loss_scales_weight_the_total():
    batch = training_batch(seed=5)
    plain = tiny_gill("opt", seed=3)(**batch)
    scaled = tiny_gill("opt", seed=3, caption_loss_scale=2.0, text_loss_scale=0.5, contrastive_loss_scale=0.0, gen_loss_scale=3.0)(**batch)
    expected = 2 * plain.caption_loss + 0.5 * plain.text_loss + 3 * plain.gen_loss
    assert torch.allclose(scaled.loss, expected, atol=1e-5)


def test_caption_concatenation_follows_the_reference_layout():
    model = tiny_gill("opt", seed=4)
    batch = training_batch(batch=2, seed=6)
    out = model(**batch, concat_captions=True)
    ids = batch["input_ids"].tolist()
    start = [row.index(IMG_TOKEN_IDS[0]) for row in ids]
    # Captioning: [v1 BOS cap1 | v2 cap2 (no BOS) | block1 pad1 | block2 pad2], labels on captions.
    labels = out.caption_labels[0].tolist()
    expected = [-100] * 4 + ids[0][: start[0]] + [-100] * 4 + ids[1][1 : start[1]]
    assert labels[: len(expected)] == expected
    assert set(labels[len(expected):]) == {-100}
    assert out.caption_labels.shape == (1, 2 * (4 + 16) - 1)
    # Text pass: the reference masks everything from the first [IMG1], the second caption included.
    text_labels = out.text_labels[0].tolist()
    assert text_labels[: start[0] + 1] == ids[0][: start[0] + 1]
    assert set(text_labels[start[0] + 1 :]) == {-100}
    # Both examples' [IMG] states come from the concatenated row, at their own blocks.
    separate = model(**batch)
    assert torch.allclose(out.img_hidden_states[0], separate.img_hidden_states[0], atol=1e-5)
    assert out.img_hidden_states.shape == separate.img_hidden_states.shape
    with pytest.raises(ValueError, match="even"):
        model(**training_batch(batch=3), concat_captions=True)


def test_concat_probability_draws_per_pass_from_torch_rng():
    model = tiny_gill("opt")
    batch = training_batch(batch=2)
    shapes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = model(**batch, concat_captions=0.5)
        shapes.add((out.caption_labels.shape[0], out.text_labels.shape[0]))
    assert shapes == {(1, 1), (1, 2), (2, 1), (2, 2)}  # the two passes draw independently


# ----- token ids and logits ----------------------------------------------------------------------


@pytest.mark.parametrize("kind, width", [("opt", 309), ("gpt2", 309), ("llama", 320)])
def test_logits_width_and_columns_without_rows(kind, width):
    model = tiny_gill(kind)
    assert model.logits_width == width
    ids = torch.tensor([[BOS_ID, 5, 6, 7]])
    logits = model(input_ids=ids, use_cache=True).logits
    assert logits.shape == (1, 4, width)
    lm_logits = model.language_model(input_ids=ids).logits
    rows = LM_ROWS[kind]
    plain = [c for c in range(rows) if c not in IMG_TOKEN_IDS]
    assert torch.allclose(logits[..., plain], lm_logits[..., plain], atol=1e-5)
    hidden = model.language_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(logits[..., IMG_TOKEN_IDS], hidden @ model.img_output_rows.T, atol=1e-5)
    no_row = [c for c in range(width) if c >= rows and c not in IMG_TOKEN_IDS]
    assert bool(torch.isinf(logits[..., no_row]).all())
    assert (IMAGE_TOKEN_ID in no_row) == (kind == "gpt2")  # GPT-2's tokenizer fills every LM row


@pytest.mark.parametrize("kind", KINDS)
def test_compute_logits_leaves_the_lm_logits_alone_and_passes_gradients(kind):
    model = tiny_gill(kind)
    hidden = torch.randn(2, 3, model.config.text_config.hidden_size)
    lm_logits = torch.randn(2, 3, LM_ROWS[kind], requires_grad=True)
    before = lm_logits.detach().clone()
    logits = model.compute_logits(hidden, lm_logits)
    assert torch.equal(lm_logits.detach(), before)  # a new tensor, also where no column is added (llama)
    assert torch.equal(logits[..., IMG_TOKEN_IDS], hidden @ model.img_output_rows.detach().T)
    logits[..., IMG_TOKEN_IDS].sum().backward(inputs=[lm_logits, model.img_output_rows])
    assert not lm_logits.grad.any()  # the [IMG] columns do not come from the LM's logits
    assert torch.allclose(model.img_output_rows.grad, hidden.sum((0, 1)).expand(len(IMG_TOKEN_IDS), -1), atol=1e-5)


@pytest.mark.parametrize("ids", [[[BOS_ID, 5, 6]], [[BOS_ID, IMG_TOKEN_IDS[2], 6], [IMG_TOKEN_IDS[7], 5, IMG_TOKEN_IDS[0]]]])
def test_embed_tokens_is_the_same_with_and_without_gradients(ids):
    model = tiny_gill("llama")
    ids = torch.tensor(ids)
    with torch.no_grad():
        no_grad = model.embed_tokens(ids)
    with_grad = model.embed_tokens(ids)
    expected = model.get_input_embeddings()(ids.clamp(max=LM_ROWS["llama"] - 1)).detach()
    for slot, token in enumerate(IMG_TOKEN_IDS):
        expected[ids == token] = model.img_embeddings.detach()[slot]
    assert torch.equal(no_grad, expected) and torch.equal(with_grad.detach(), expected)
    with_grad.sum().backward(inputs=[model.img_embeddings])
    # with gradients on, `img_embeddings` stays in the graph (zero gradient for a text-only batch)
    assert torch.equal(model.img_embeddings.grad != 0, torch.isin(torch.tensor(IMG_TOKEN_IDS), ids)[:, None].expand_as(model.img_embeddings))


def test_image_token_without_row_is_rejected_as_input():
    model = tiny_gill("gpt2")
    with pytest.raises(ValueError, match="no embedding row"):
        model.embed_tokens(torch.tensor([[BOS_ID, IMAGE_TOKEN_ID + 40]]))


def test_opt_like_tokenizer_ids_follow_the_tokenizer(tmp_path):
    from tiny_tokenizers import opt_like_tokenizer

    from gill_hf import add_gill_tokens

    tokenizer = opt_like_tokenizer(tmp_path)
    size = len(tokenizer)
    image_id, img_ids = add_gill_tokens(tokenizer)
    assert image_id == size and img_ids == list(range(size + 1, size + 9))
    assert add_gill_tokens(tokenizer) == (image_id, img_ids)  # idempotent
    # An LM with a few more rows than the tokenizer (as OPT's 50272 > 50265): the [IMG] ids below
    # the row count override LM rows, the others extend the logits.
    config = gill_config("opt", img_token_ids=img_ids, image_token_id=image_id, vocab_size=len(tokenizer))
    config.text_config.vocab_size = size + 5
    model = GillForConditionalGeneration(config)
    assert model.logits_width == size + 9


# ----- decoding ------------------------------------------------------------------------------------


def test_prompt_placeholders_take_the_visual_prefix():
    model = tiny_gill("opt")
    pixel_values = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([[IMAGE_TOKEN_ID] * 4 + [BOS_ID, 9, 10] + [IMAGE_TOKEN_ID] * 4 + [11]])
    embeds = model.embed_prompt(ids, pixel_values)
    prefix = model.get_visual_prefix(pixel_values)
    assert torch.equal(embeds[0, :4], prefix[0]) and torch.equal(embeds[0, 7:11], prefix[1])
    assert torch.equal(embeds[0, 4], model.get_input_embeddings().weight[BOS_ID])
    with pytest.raises(ValueError, match="placeholders"):
        model.embed_prompt(ids, pixel_values[:1])
    with pytest.raises(ValueError, match="pixel_values"):
        model.embed_prompt(ids)


def test_greedy_generate_equals_a_full_sequence_loop():
    model = tiny_gill("opt", seed=7)
    pixel_values = torch.rand(1, 3, 32, 32)
    ids = torch.tensor([[IMAGE_TOKEN_ID] * 4 + [BOS_ID, 9, 10, 11]])
    generated = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=6, do_sample=False,
                               eos_token_id=None, pad_token_id=1)
    new_tokens = generated[0, ids.shape[1]:].tolist()
    embeds = model.embed_prompt(ids, pixel_values)
    loop = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            loop.append(token)
            embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[token]]))], dim=1)
    assert new_tokens == loop


@pytest.mark.parametrize("kind", KINDS)
def test_logits_to_keep_gives_the_last_positions_logits(kind):
    model = tiny_gill(kind)
    assert model._supports_logits_to_keep()  # so that generate() asks for the last position only
    pixel_values = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([[IMAGE_TOKEN_ID] * 4 + [BOS_ID, 9, 10, 11]] * 2)
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixel_values, use_cache=True).logits
        last = model(input_ids=ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1).logits
        chosen = model(input_ids=ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=torch.tensor([5, 7])).logits
    assert full.shape == (2, 8, model.logits_width) and last.shape == (2, 1, model.logits_width)
    assert torch.allclose(last, full[:, -1:], atol=1e-5) and torch.allclose(chosen, full[:, [5, 7]], atol=1e-5)
    assert bool(torch.isinf(last[..., IMAGE_TOKEN_ID]).all()) == (kind == "gpt2")  # a column without an LM row stays -inf


# ----- heads ------------------------------------------------------------------------------------------


def test_retrieval_embeddings_are_normalised_and_decision_heads_take_their_inputs():
    model = tiny_gill("opt", decision_head_type="hidden_and_score")
    image = model.get_image_retrieval_embeds(torch.rand(3, 3, 32, 32))
    text = model.get_text_retrieval_embeds(torch.randn(3, 8, 32))
    assert torch.allclose(image.norm(dim=-1), torch.ones(3)) and torch.allclose(text.norm(dim=-1), torch.ones(3))
    assert model.decision_head.linear.in_features == 33
    hidden, score = torch.randn(2, 32), torch.tensor([3.0, -1.0])
    probs = model.get_decision_probs(hidden, score)
    manual = F.softmax(torch.cat([hidden, score[:, None]], dim=-1) @ model.decision_head.linear.weight.T + model.decision_head.linear.bias, dim=-1)
    assert torch.allclose(probs, manual, atol=1e-6)
    with pytest.raises(ValueError, match="max_retrieval_scores"):
        model.get_decision_probs(hidden)
    with pytest.raises(ValueError, match="no decision head"):
        tiny_gill("opt").get_decision_probs(hidden)


# ----- bad input ----------------------------------------------------------------------------------------


def test_bad_training_inputs_raise_clear_errors():
    model = tiny_gill("opt")
    batch = training_batch(batch=2)
    broken = batch["input_ids"].clone()
    broken[0, broken[0].tolist().index(IMG_TOKEN_IDS[0]) + 3] = 5
    with pytest.raises(ValueError, match="input_ids.*incomplete"):
        model(**{**batch, "input_ids": broken})
    no_block = torch.full_like(batch["input_ids"], 7)
    with pytest.raises(ValueError, match="input_ids.*no \\[IMG\\] block"):
        model(**{**batch, "input_ids": no_block})
    with pytest.raises(ValueError, match="gen_targets"):
        model(**{**batch, "gen_targets": torch.zeros(2, 5, 20)})
    with pytest.raises(ValueError, match="images"):
        model(**{**batch, "pixel_values": torch.rand(3, 3, 32, 32)})
    with pytest.raises(ValueError, match="pixel_values"):
        model(**{**batch, "pixel_values": torch.rand(2, 32, 32)})
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="concat_captions"):
        model(**batch, concat_captions=1.5)


def test_sequences_longer_than_the_context_are_rejected():
    model = tiny_gill("opt")  # max_position_embeddings 128
    with pytest.raises(ValueError, match="longer than the LM's context of 128"):
        model(input_ids=torch.full((1, 129), 7), use_cache=True)
    row = [BOS_ID] + [7] * 117 + IMG_TOKEN_IDS  # 126 tokens fit alone, not after a 4-vector prefix
    with pytest.raises(ValueError, match="visual prefixes included"):
        model(input_ids=torch.tensor([row]), pixel_values=torch.rand(1, 3, 32, 32))
    model(input_ids=torch.tensor([row]))  # the text pass alone fits


def test_config_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="img_token_ids"):
        gill_config("opt", img_token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="decision_head_type"):
        gill_config("opt", decision_head_type="both")
    with pytest.raises(ValueError, match="text_emb_layers"):
        gill_config("opt", text_emb_layers=[-1, -2])
    with pytest.raises(ValueError, match="img_token_ids"):
        GillForConditionalGeneration(GillConfig())
