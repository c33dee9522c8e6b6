"""The fused decoding step for Llama LMs (pipelines/cpu_decode_gill.py), compiled (one sequence, where
a C compiler built the kernels) and as numpy calls, against the model's own modules. Budget: about 3 s
of tests plus ~3 s to load the shipped GILL-tiny (7-10 s with the imports) on 2 cores."""

from __future__ import annotations

import pytest
import torch
from tiny_models import HIDDEN, IMG_TOKEN_IDS, tiny_gill
from torch_threads import torch_threads
from transformers import DynamicCache, LlamaConfig

from gill_hf.modeling.lora_gill import apply_lora
from gill_hf.pipelines import cpu_decode_gill
from gill_hf.pipelines.cpu_blas_gill import numpy_blas_linears
from gill_hf.pipelines.cpu_decode_gill import NumpyLlamaDecoder
from gill_hf.pipelines.cpu_kernels_gill import cpu_kernels
from gill_hf.pipelines.decoding_gill import GillDecodingOptions, GillTokenIds, gill_decode

ROPES = {"default": {"rope_type": "default", "rope_theta": 10000.0},
         "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
         "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16, "rope_theta": 500000.0},
         "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}}


@pytest.fixture(autouse=True)
def two_threads():
    with torch_threads(2):
        yield


@pytest.fixture(params=["compiled", "numpy"])
def step_kind(request, monkeypatch):
    """The fused step with the compiled kernels (a one-sequence decoding runs as compiled C), or without
    them (numpy calls for every batch, q/k/v stacked)."""
    if request.param == "numpy":
        monkeypatch.setattr(cpu_decode_gill, "cpu_kernels", lambda: None)
    elif cpu_kernels() is None:
        pytest.skip("no C compiler: the compiled step is not built")
    return request.param


def gqa_gill(rope: str = "default", seed: int = 3, tie: bool = False, **text_overrides):
    """A tiny GILL on a Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    fields = dict(vocab_size=320, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3,
                  pad_token_id=None, rope_parameters=ROPES[rope])
    text = LlamaConfig(**{**fields, **text_overrides})
    return tiny_gill("llama", seed=seed, text_config=text)


def padded_prompts(length: int = 9):
    input_ids = torch.randint(4, 290, (3, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return input_ids, mask


def token_ids(model) -> GillTokenIds:
    return GillTokenIds(img_token_ids=IMG_TOKEN_IDS, image_token_id=model.config.image_token_id,
                        vocab_size=model.config.vocab_size, eos_token_id=None, pad_token_id=0, newline_token_id=None)


def module_steps(lm, input_ids, mask, tokens, layer):
    """The LM's own cached steps (numpy's BLAS for its products, as the fused step): logits and layer states."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, out = DynamicCache(config=lm.config), []
    lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    for step, token in enumerate(tokens):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        result = lm(input_ids=token[:, None], attention_mask=mask, position_ids=positions[:, -1:] + 1 + step, cache=cache,
                    use_cache=True, output_hidden_states=True)
        out.append((result.logits[:, -1], result.hidden_states[layer][:, -1]))
    return out


def fused_steps(lm, input_ids, mask, tokens, layer, compiled: bool | None = None):
    """The decoder's steps: logits and layer states; `compiled` (if given): whether it must run compiled."""
    decoder = NumpyLlamaDecoder(lm, layer)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.config)
    with numpy_blas_linears(lm):
        lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        decoder.start(cache, mask, positions[:, -1] + 1, len(tokens))
        assert compiled is None or (decoder.compiled is not None) == compiled
        out = []
        for token in tokens:
            logits, _, hidden = decoder.step(lm.get_input_embeddings()(token))
            out.append((logits, hidden))
    return out


def assert_one_sequence_matches_the_modules(lm, layer: int, compiled: bool, steps: int = 3) -> None:
    """One sequence's fused steps against the model's own modules: logits and layer states within 1e-5."""
    input_ids, mask = (tensor[:1] for tensor in padded_prompts())
    tokens = list(torch.randint(4, 290, (steps, 1), generator=torch.Generator().manual_seed(2)))
    with numpy_blas_linears(lm):
        expected = module_steps(lm, input_ids, mask, tokens, layer)
    for (logits, hidden), (want, want_hidden) in zip(fused_steps(lm, input_ids, mask, tokens, layer, compiled), expected, strict=True):
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)


# the rows of `padded_prompts` decoded: one sequence (compiled where built), one left-padded
# sequence and a padded batch (numpy calls: the compiled step takes one sequence without padding)
ROWS = {"one": slice(0, 1), "one padded": slice(1, 2), "batch": slice(0, 3)}


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("layer", [-1, 0, 2])
@pytest.mark.parametrize("rows", sorted(ROWS))
@torch.no_grad()
def test_each_step_matches_the_models_own_modules(rope, layer, rows, step_kind):
    lm = gqa_gill(rope).language_model
    input_ids, mask = (tensor[ROWS[rows]] for tensor in padded_prompts())
    tokens = list(torch.randint(4, 290, (6, input_ids.shape[0]), generator=torch.Generator().manual_seed(2)))
    with numpy_blas_linears(lm):
        expected = module_steps(lm, input_ids, mask, tokens, layer)
    got = fused_steps(lm, input_ids, mask, tokens, layer, compiled=step_kind == "compiled" and rows == "one")
    for (logits, hidden), (want_logits, want_hidden) in zip(got, expected, strict=True):
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ["one", "batch"])
@torch.no_grad()
def test_lora_layers_are_applied_as_peft_applies_them(rows, step_kind):
    model = gqa_gill()  # untied: merging the head's adapter leaves the input embeddings alone
    apply_lora(model, r=4, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "lm_head"])
    for name, param in model.language_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters an effect
            param.normal_(std=0.5)
    lm, (input_ids, mask) = model.language_model, (tensor[ROWS[rows]] for tensor in padded_prompts())
    tokens = list(torch.randint(4, 290, (4, input_ids.shape[0]), generator=torch.Generator().manual_seed(2)))
    if step_kind == "compiled" and rows == "one":
        assert NumpyLlamaDecoder(lm).kernel_model is not None  # each layer's adapter in the compiled step
    with numpy_blas_linears(lm):
        expected = module_steps(lm, input_ids, mask, tokens, -1)
    got = fused_steps(lm, input_ids, mask, tokens, -1)
    for (logits, _), (want, _) in zip(got, expected, strict=True):
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    for module in lm.modules():  # adapters off: the base weights alone, on both paths
        if hasattr(module, "lora_A"):
            module.enable_adapters(False)
    plain = fused_steps(lm, input_ids, mask, tokens, -1)
    assert not torch.allclose(plain[0][0], got[0][0], atol=1e-3)
    with numpy_blas_linears(lm):
        torch.testing.assert_close(plain[0][0], module_steps(lm, input_ids, mask, tokens, -1)[0][0], rtol=1e-5, atol=1e-5)
    lora_layers = [module for module in lm.modules() if hasattr(module, "lora_A")]
    for module in lora_layers:  # merged, adapters on: the base weight holds the adapters
        module.enable_adapters(True)
        module.merge()
    torch.testing.assert_close(fused_steps(lm, input_ids, mask, tokens, -1)[0][0], got[0][0], rtol=1e-4, atol=1e-4)
    lora_layers[0].enable_adapters(False)  # merged but disabled: peft would unmerge at the next forward
    assert "merged LoRA with the adapters disabled" in NumpyLlamaDecoder.unsupported(lm)


@pytest.mark.parametrize("heads", [(48, 6, 2, 16), (32, 4, 1, 16), (32, 4, 4, 8)], ids=["group 3", "MQA", "MHA"])
@torch.no_grad()
def test_the_compiled_step_reads_every_layer_layout_and_each_layers_own_settings(heads):
    """Head layouts where heads * head_dim differs from the width, every norm with its own eps, and LoRA on
    all seven projections and the head, each with its own rank and scaling."""
    from peft import LoraConfig, inject_adapter_in_model

    hidden, num_heads, num_kv_heads, head_dim = heads  # q/k/v wider than the hidden size in the first two
    model = gqa_gill(hidden_size=hidden, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim)
    lm = model.language_model
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=names, rank_pattern={n: 2 + i for i, n in enumerate(names)},
                        alpha_pattern={n: 3 + 2 * i for i, n in enumerate(names)})
    inject_adapter_in_model(config, lm)
    for name, param in lm.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.5)
    norms = [module for module in lm.modules() if type(module).__name__ == "LlamaRMSNorm"]
    for index, norm in enumerate(norms):
        norm.variance_epsilon = 0.05 * (index + 1)  # large enough to move the logits
    assert_one_sequence_matches_the_modules(lm, 2, compiled=cpu_kernels() is not None, steps=4)


@torch.no_grad()
def test_weights_the_compiled_step_cannot_read_in_place_leave_it_to_numpy():
    lm = gqa_gill().language_model
    lm.lm_head.weight = torch.nn.Parameter(torch.randn(HIDDEN, 320).t())  # (vocab, hidden), strided
    assert NumpyLlamaDecoder.unsupported(lm) is None and NumpyLlamaDecoder(lm).kernel_model is None
    assert_one_sequence_matches_the_modules(lm, -1, compiled=False)


@torch.no_grad()
def test_two_active_adapters_on_a_layer_leave_the_step_to_numpy():
    """The compiled step applies one LoRA pair per layer; with two active, the numpy calls run instead."""
    from peft import LoraConfig, inject_adapter_in_model

    model = gqa_gill()
    apply_lora(model, r=4, target_modules=["q_proj"])
    lm = model.language_model
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), lm, adapter_name="second")
    for module in lm.modules():
        if hasattr(module, "lora_A"):
            module.set_adapter(["default", "second"])
    for name, param in lm.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.5)
    assert NumpyLlamaDecoder(lm).kernel_model is None
    assert_one_sequence_matches_the_modules(lm, -1, compiled=False)


@torch.no_grad()
def test_a_decoder_built_after_new_weights_reads_them_not_an_earlier_decoders_copy(step_kind):
    lm = gqa_gill().language_model
    input_ids, mask = padded_prompts() if step_kind == "numpy" else (tensor[:1] for tensor in padded_prompts())
    tokens = [torch.tensor([5, 6, 7])[: input_ids.shape[0]]]
    before = fused_steps(lm, input_ids, mask, tokens, -1)  # numpy: its stacked q/k/v arrays go back to the spares
    if step_kind == "numpy":
        assert len(cpu_decode_gill._SPARE_STACKS[lm]) == 1
        alive = [NumpyLlamaDecoder(lm) for _ in range(3)]  # one takes the spare set, two build their own
        assert not cpu_decode_gill._SPARE_STACKS[lm] and len({id(d.layers[0][1].weight) for d in alive}) == 3
        del alive
        assert len(cpu_decode_gill._SPARE_STACKS[lm]) == 1  # one set kept, not one per decoder
    else:  # the compiled step reads q/k/v where they are: no copies
        assert lm not in cpu_decode_gill._SPARE_STACKS and NumpyLlamaDecoder(lm).layers[0][1].weight is None
    lm.model.layers[0].self_attn.k_proj.weight.mul_(3.0)  # in place: same storage
    after = fused_steps(lm, input_ids, mask, tokens, -1, compiled=step_kind == "compiled")
    with numpy_blas_linears(lm):
        want = module_steps(lm, input_ids, mask, tokens, -1)
    assert not torch.allclose(before[0][0], after[0][0], atol=1e-3)
    torch.testing.assert_close(after[0][0], want[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=20, gen_scale_factor=3.0),  # blocks chosen: [IMG] states compared
    dict(max_new_tokens=6, decoding="reference", ret_scale_factor=1.3, min_word_tokens=1),
    dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9),
])
@pytest.mark.parametrize("rows", ["one", "batch"])
def test_gill_decode_gives_the_same_answers_as_generate(settings, rows, monkeypatch):
    model = gqa_gill(tie=True)
    input_ids, mask = (tensor[ROWS[rows]] for tensor in padded_prompts())
    steps = []
    step = NumpyLlamaDecoder.step
    monkeypatch.setattr(NumpyLlamaDecoder, "step", lambda self, e: steps.append(self.compiled is not None) or step(self, e))
    results = {}
    for fused in (False, True):
        generators = [torch.Generator().manual_seed(10 + i) for i in range(input_ids.shape[0])]
        options = GillDecodingOptions(fused_step=fused, **settings)
        results[fused] = gill_decode(model, input_ids, mask, None, options, token_ids(model), generators)
        assert bool(steps) == fused
    assert all(steps) == (rows == "one" and cpu_kernels() is not None)  # one sequence: the compiled step
    if "gen_scale_factor" in settings:
        assert sum(len(row.block_starts) for row in results[True]) > 0
    for module_row, fused_row in zip(results[False], results[True]):
        assert fused_row.token_ids == module_row.token_ids and fused_row.block_starts == module_row.block_starts
        torch.testing.assert_close(fused_row.img_hidden_states, module_row.img_hidden_states, rtol=1e-5, atol=1e-5)


def test_an_image_prompt_decodes_the_same():
    model = gqa_gill()
    n = model.config.num_visual_tokens
    input_ids = torch.cat([torch.full((1, n), model.config.image_token_id), torch.randint(4, 290, (1, 5))], dim=-1)
    pixel_values = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    answers = [gill_decode(model, input_ids, torch.ones_like(input_ids), pixel_values,
                           GillDecodingOptions(max_new_tokens=15, gen_scale_factor=3.0, fused_step=fused), token_ids(model), [None])[0]
               for fused in (False, True)]
    assert answers[0].token_ids == answers[1].token_ids and len(answers[0].token_ids) == 15


@torch.no_grad()
def test_what_it_cannot_reproduce_is_named_and_left_to_generate(monkeypatch):
    assert NumpyLlamaDecoder.unsupported(gqa_gill().language_model) is None
    assert "model_type 'opt'" in NumpyLlamaDecoder.unsupported(tiny_gill("opt").language_model)
    assert "window" in NumpyLlamaDecoder.unsupported(gqa_gill(sliding_window=4).language_model)
    assert "tie_last_hidden_states" in NumpyLlamaDecoder.unsupported(gqa_gill(tie_last_hidden_states=False).language_model)
    assert "not a LlamaForCausalLM" in NumpyLlamaDecoder.unsupported(gqa_gill().language_model.model)  # the bare body
    assert "float32" in NumpyLlamaDecoder.unsupported(gqa_gill().language_model.to(torch.bfloat16))
    lm = gqa_gill().language_model
    handle = lm.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 2)
    assert "hooks" in NumpyLlamaDecoder.unsupported(lm)
    handle.remove()
    lm.model.layers[0].mlp.down_proj = torch.nn.Linear(64, HIDDEN, bias=True)
    assert "bias" in NumpyLlamaDecoder.unsupported(lm)
    with pytest.raises(ValueError, match="cannot run this model: .*bias"):
        NumpyLlamaDecoder(lm)
    monkeypatch.setattr(NumpyLlamaDecoder, "step", lambda *args: pytest.fail("the fused step ran"))
    model = tiny_gill("opt")
    input_ids, mask = padded_prompts()
    rows = gill_decode(model, input_ids, mask, None, GillDecodingOptions(max_new_tokens=4), token_ids(model), [None] * 3)
    assert [len(row.token_ids) for row in rows] == [4, 4, 4]


def test_a_hidden_layer_outside_the_lm_is_refused():
    lm = gqa_gill().language_model  # 3 layers: hidden states 0..3, or -4..-1
    assert NumpyLlamaDecoder(lm, -4).hidden_layer == 0 and NumpyLlamaDecoder(lm, 3).hidden_layer == 3
    for layer in (4, -5):
        with pytest.raises(ValueError, match="`hidden_layer` must index the LM's 4 hidden states"):
            NumpyLlamaDecoder(lm, layer)


def test_decoding_past_the_lms_context_is_refused_as_generate_refuses_it():
    model = gqa_gill(max_position_embeddings=16)
    input_ids, mask = padded_prompts(length=12)
    messages = []
    for fused in (False, True):
        with pytest.raises(ValueError, match="longer than the LM's context of 16") as error:
            gill_decode(model, input_ids, mask, None, GillDecodingOptions(max_new_tokens=8, fused_step=fused), token_ids(model), [None] * 3)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_the_shipped_gill_tiny_decodes_through_numpy_blas_and_the_fused_step(monkeypatch):
    """Loaded without a `dtype`, GILL-tiny's world CLIP stays float16 beside its float32 LM: the LM must
    still move (a block that any other dtype turned off left that model on torch's matmuls)."""
    from gill_hf import GillForConditionalGeneration, GillProcessor
    from gill_hf.world import gill_tiny

    if not (gill_tiny.GILL_TINY_DIR / "gill_adapter.safetensors").is_file():
        pytest.skip("the GILL-tiny adapter is not committed in this checkout")
    model = GillForConditionalGeneration.from_pretrained(gill_tiny.GILL_TINY_DIR).eval()
    processor = GillProcessor.from_pretrained(gill_tiny.GILL_TINY_DIR)
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.float16}
    assert NumpyLlamaDecoder.unsupported(model.language_model) is None  # LoRA on q/v included
    with torch.no_grad(), numpy_blas_linears(model) as routed:
        assert routed > 0
    steps = []
    step = NumpyLlamaDecoder.step
    monkeypatch.setattr(NumpyLlamaDecoder, "step", lambda self, e: steps.append(1) or step(self, e))
    inputs = processor(text=["A small red circle on a blue background, then"])
    ids = GillTokenIds(img_token_ids=list(model.config.img_token_ids), image_token_id=model.config.image_token_id,
                       vocab_size=model.config.vocab_size, eos_token_id=None, pad_token_id=0, newline_token_id=None)
    answers = [gill_decode(model, inputs["input_ids"], inputs["attention_mask"], None,
                           GillDecodingOptions(max_new_tokens=12, min_word_tokens=12, fused_step=fused), ids, [None])[0].token_ids
               for fused in (False, True)]
    assert len(steps) == 11 and answers[0] == answers[1]
