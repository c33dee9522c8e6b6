"""A fused CPU decoding step for Llama-family language models: compiled C for one sequence, numpy
calls for a batch.

At batch 1 a cached step of a small LM is ~200 matrix-vector products plus thousands of tiny
operators, and on CPU the tiny ones cost more than their arithmetic: an eager Hugging Face step of
SmolLM2-135M spends ~3.4 ms in torch operators and ~4 ms in Python module calls around 13 ms of
weight streaming (README, "Benchmarks"). `NumpyLlamaDecoder` runs the same step over the model's own
weights as one function. For one sequence without padding it is one call of the compiled step of
`cpu_kernels_gill` (products, RMSNorm, rotary embeddings, grouped-query attention over a
preallocated KV cache, SwiGLU and LoRA in C, threads split inside it) where a C compiler built it.
Otherwise, and for a batch, it is numpy calls: the products by `blas_product` exactly as
`numpy_blas_linears` routes them (the streaming kernel for products of up to 8 rows where it was
built, else numpy's BLAS; the same calls, so the same bits), the rest a few numpy calls each, and
peft LoRA layers as their two extra products. `fused_generate` is `generate`'s loop around it, with
transformers' `LogitsProcessor`s and `StoppingCriteria` applied as `generate` applies them; the
prompt's pass (with its images) stays with the model's own forward.

Only what it reproduces is taken: a CPU float32 Llama (`model_type` "llama") with plain or LoRA
projections without biases, SiLU, full attention, and rotary embeddings that depend on the position
alone; `NumpyLlamaDecoder.unsupported(model)` names the first thing that does not fit, and the caller
keeps `generate`. Norms, attention and activations sum in other orders than torch's, so logits
differ from the module path in the last bits (~1e-6 relative); greedy tokens are the same in the
tests and the benchmarks.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import numpy as np
import torch

from .cpu_blas_gill import blas_product, product_threads
from .cpu_kernels_gill import LlamaStepTensors, cpu_kernels

logger = logging.getLogger(__name__)
_ROPE_BY_POSITION = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position alone
_SPARE_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LM -> [stacked q/k/v arrays not in use]


class _Projection:
    """Bias-free linear layers run as one product with their outputs side by side (a single layer, or
    q/k/v), with each layer's LoRA pairs applied to its slice of the output as peft does. With `stack`
    the layers' weights are copied into one matrix (into `out` where it fits): one numpy matrix-vector
    product streams them faster than three; the compiled step reads them where they are."""

    def __init__(self, *modules: torch.nn.Module, stack: bool = True, out: np.ndarray | None = None):
        bases = [getattr(module, "base_layer", module) for module in modules]
        self.weights = [base.weight.detach().numpy() for base in bases]
        self.weight = self.weights[0] if len(self.weights) == 1 else None  # the stacked copy, if any
        if len(self.weights) > 1 and stack:
            fits = out is not None and out.shape == (sum(w.shape[0] for w in self.weights), self.weights[0].shape[1])
            self.weight = np.concatenate(self.weights, out=out if fits else None)
        self.low_rank, self.adapters, start = [], [], 0
        for module, base, weight in zip(modules, bases, self.weights):
            rows = slice(start, start + weight.shape[0])
            start, pairs = rows.stop, []
            if base is not module and not module.merged and not module.disable_adapters:
                pairs = [(module.lora_A[name].weight.detach().numpy(), module.lora_B[name].weight.detach().numpy(),
                          float(module.scaling[name])) for name in module.active_adapters if name in module.lora_A]
            self.adapters.append(pairs)
            self.low_rank += [(rows, a, b, np.float32(scaling)) for a, b, scaling in pairs]

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.weight is not None:
            out = blas_product(rows, self.weight)
        else:
            out = np.concatenate([blas_product(rows, weight) for weight in self.weights], axis=1)
        for part, a, b, scaling in self.low_rank:  # peft's order: result + lora_B(lora_A(x)) * scaling
            out[:, part] += blas_product(blas_product(rows, a), b) * scaling
        return out

    def kernel_layers(self) -> list[tuple] | None:
        """Each layer as `(weight, lora_a, lora_b, lora_scaling)` for the compiled step, or None where a
        layer has more than one active adapter (the compiled step applies one)."""
        if any(len(pairs) > 1 for pairs in self.adapters):
            return None
        return [(weight, *(pairs[0] if pairs else (None, None, 0.0))) for weight, pairs in zip(self.weights, self.adapters)]


def _projection_problem(module: torch.nn.Module) -> str | None:
    base = getattr(module, "base_layer", module)
    if type(base) is not torch.nn.Linear:
        return type(base).__name__
    if base.bias is not None:
        return "nn.Linear with a bias"
    if base is not module:  # a peft LoRA layer: vanilla LoRA only, dropout inactive
        if getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}) and any(module.lora_bias.values()):
            return "a LoRA variant (DoRA, ...) or LoRA bias"
        if any(type(layer) is not torch.nn.Linear or layer.bias is not None for layer in (*module.lora_A.values(), *module.lora_B.values())):
            return "LoRA layers other than bias-free nn.Linear"
        if module.training and any(not isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values()):
            return "LoRA dropout in training mode"
        if module.merged and module.disable_adapters:  # peft unmerges at its next forward: the weight is about to change
            return "merged LoRA with the adapters disabled"
    return None


class NumpyLlamaDecoder:
    """One cached decoding step of a Llama language model for a batch of rows: one compiled call for
    one sequence without padding (where `cpu_kernels_gill` was built), numpy calls otherwise.

    Build it from the LM (`LlamaForCausalLM`), hand it the KV cache of the prompt's pass with
    `start`, then call `step(token_embeddings)` once per new token: it returns the new position's
    logits, the final norm's output and the hidden state of layer `hidden_layer` (transformers'
    indexing of `output_hidden_states`: 0 the embeddings, -1 the final norm's output). It reads the
    weights when it is built (as views, except that without the compiled kernels q/k/v are stacked
    into one copy per layer): build a new one after changing them.
    """

    def __init__(self, lm: torch.nn.Module, hidden_layer: int = -1):
        problem = self.unsupported(lm)
        if problem is not None:
            raise ValueError(f"NumpyLlamaDecoder cannot run this model: {problem}.")
        self._build(lm, hidden_layer)

    @classmethod
    def for_model(cls, lm: torch.nn.Module, hidden_layer: int = -1) -> NumpyLlamaDecoder | None:
        """The decoder for `lm`, or None where `unsupported(lm)` names a problem."""
        if cls.unsupported(lm) is not None:
            return None
        decoder = cls.__new__(cls)
        decoder._build(lm, hidden_layer)
        return decoder

    def _build(self, lm: torch.nn.Module, hidden_layer: int) -> None:
        config, body = lm.config, lm.model
        self.num_layers = config.num_hidden_layers
        if not -self.num_layers - 1 <= hidden_layer <= self.num_layers:
            raise ValueError(f"`hidden_layer` must index the LM's {self.num_layers + 1} hidden states, got {hidden_layer}.")
        self.hidden_layer = hidden_layer % (self.num_layers + 1)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = body.rotary_emb
        # The compiled step reads q/k/v where they are; numpy's stacks them. The stacked copies (12% of
        # SmolLM2's weights) are refilled at each build, into the arrays of an earlier decoder of the
        # same LM where one is done with them: fresh ones cost ~30 ms of page faults, a refill ~4 ms.
        self.kernels = cpu_kernels()
        stack = self.kernels is None
        spare = _SPARE_STACKS.setdefault(lm, []) if stack else []
        stacks = spare.pop() if spare else []
        stacks = stacks if len(stacks) == len(body.layers) else [None] * len(body.layers)
        self.layers, kernel_layers = [], []
        for index, layer in enumerate(body.layers):
            attention, mlp = layer.self_attn, layer.mlp
            qkv = _Projection(attention.q_proj, attention.k_proj, attention.v_proj, stack=stack, out=stacks[index])
            stacks[index] = qkv.weight
            norm_1, norm_2 = _RMSNorm(layer.input_layernorm), _RMSNorm(layer.post_attention_layernorm)
            o, gate, up, down = (_Projection(module) for module in (attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            self.layers.append((norm_1, qkv, o, norm_2, gate, up, down, np.float32(attention.scaling)))
            projections = [qkv.kernel_layers(), *(projection.kernel_layers() for projection in (o, gate, up, down))]
            kernel_layers.append(None if None in projections else (
                norm_1.weight, norm_2.weight, sum(projections, []), norm_1.eps, norm_2.eps, attention.scaling))
        if stack:
            weakref.finalize(self, _keep_spare, spare, stacks)
        self.final_norm = _RMSNorm(body.norm)
        self.head = _Projection(lm.lm_head)
        head = self.head.kernel_layers()
        # the compiled step's tensors (None: numpy's step, for every batch)
        self.kernel_model = None
        if self.kernels is not None and head is not None and None not in kernel_layers:
            try:
                self.kernel_model = LlamaStepTensors(kernel_layers, self.final_norm.weight, self.final_norm.eps, head[0],
                                                     self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_layer)
            except ValueError as error:  # weights it cannot read in place (strided, ...): numpy's step reads them
                logger.debug("the compiled decoding step is not used: %s", error)

    @staticmethod
    def unsupported(lm: torch.nn.Module) -> str | None:
        """Why the step cannot reproduce `lm` (None: it can)."""
        config, body = getattr(lm, "config", None), getattr(lm, "model", None)
        if getattr(config, "model_type", None) != "llama" or not all(
                hasattr(part, name) for part, name in ((lm, "lm_head"), (body, "layers"), (body, "norm"), (body, "rotary_emb"))):
            return f"not a LlamaForCausalLM (model_type {getattr(config, 'model_type', None)!r})"
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in lm.parameters()):
            return "weights off the CPU or not float32"
        if config.hidden_act not in ("silu", "swish") or len(body.layers) != config.num_hidden_layers:
            return f"hidden_act {config.hidden_act!r} or a layer count other than the config's"
        if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None) or any(
                kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
            return "attention over a window or chunks of the sequence"
        if getattr(config, "tie_last_hidden_states", True) is False:
            return "tie_last_hidden_states=False (its last hidden state is not the final norm's output)"
        if lm.training and getattr(config, "attention_dropout", 0.0):
            return "attention dropout in training mode"
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") not in _ROPE_BY_POSITION:
            return f"rope_type {rope.get('rope_type')!r}"
        if any(map(_has_foreign_hooks, lm.modules())):
            return "hooks or replaced forwards on its modules"
        for layer in body.layers:
            for module in (*(getattr(layer.self_attn, f"{p}_proj") for p in "qkvo"),
                           *(getattr(layer.mlp, f"{p}_proj") for p in ("gate", "up", "down"))):
                problem = _projection_problem(module)
                if problem is not None:
                    return f"a projection is {problem}"
        return _projection_problem(lm.lm_head)

    def start(self, cache, attention_mask: torch.Tensor, next_positions: torch.Tensor, max_new_tokens: int) -> None:
        """Takes the prompt's KV cache (a `DynamicCache` after the prompt's pass), its 2-D attention
        mask (left padding masked) and each row's first new position (`(batch,)`); room for
        `max_new_tokens` steps."""
        batch, prompt_length = attention_mask.shape
        self.length, capacity = prompt_length, prompt_length + max_new_tokens
        shape = (self.num_layers, batch, self.num_kv_heads, capacity, self.head_dim)
        self.keys, self.values = np.empty(shape, np.float32), np.empty(shape, np.float32)
        for index, layer in enumerate(cache.layers):
            if layer.keys.shape[-2] != prompt_length:
                raise ValueError(f"The cache holds {layer.keys.shape[-2]} positions of a {prompt_length}-token prompt.")
            self.keys[index, :, :, :prompt_length] = layer.keys.numpy()
            self.values[index, :, :, :prompt_length] = layer.values.numpy()
        padded = (attention_mask == 0).numpy()
        self.mask = None  # additive, only where a row has padding
        if padded.any():
            self.mask = np.zeros((batch, 1, 1, capacity), np.float32)
            self.mask[:, 0, 0, :prompt_length][padded] = -np.inf
        # the model's own rotary module, once for every position the steps will use
        positions = next_positions[:, None] + torch.arange(max_new_tokens)
        cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), positions)
        self.cos, self.sin = (np.ascontiguousarray(array.numpy()[:, :, None]) for array in (cos, sin))  # (batch, steps, 1, head_dim)
        self.steps = 0
        # One sequence without padding: each step is one call of the compiled step, on the same cache.
        self.compiled = None
        if self.kernel_model is not None and batch == 1 and self.mask is None:
            self.kernel_model.start(self.keys[:, 0], self.values[:, 0])
            self.compiled = self.kernel_model

    def step(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feeds one token per row (`(batch, hidden)` input embeddings); returns the logits
        `(batch, vocab)`, the final norm's output and the hidden state of `hidden_layer` (both
        `(batch, hidden)`)."""
        if self.steps == self.cos.shape[1]:
            raise ValueError(f"The decoder was started for {self.steps} steps.")
        if self.compiled is not None:
            x = embeddings.numpy()[0].astype(np.float32, copy=True)  # the residual stream, updated in place
            logits, x, captured = self.kernels.llama_step(
                self.compiled, x, self.cos[0, self.steps, 0], self.sin[0, self.steps, 0], self.length, product_threads())
            self.length, self.steps = self.length + 1, self.steps + 1
            return torch.from_numpy(logits[None]), torch.from_numpy(x[None]), torch.from_numpy(captured[None])
        x = embeddings.numpy()
        batch, slot = x.shape[0], self.length
        cos, sin = self.cos[:, self.steps], self.sin[:, self.steps]
        captured = x if self.hidden_layer == 0 else None
        half, group = self.head_dim // 2, self.num_heads // self.num_kv_heads
        rotated = self.num_heads + self.num_kv_heads  # q and k heads, side by side in the stacked output
        for index, (norm_1, qkv_proj, o_proj, norm_2, gate, up, down, scaling) in enumerate(self.layers):
            h = norm_1(x)
            qkv = qkv_proj(h).reshape(batch, rotated + self.num_kv_heads, self.head_dim)
            qk = _rotate(qkv[:, :rotated], cos, sin, half)
            q = qk[:, : self.num_heads]
            keys, values = self.keys[index], self.values[index]
            keys[:, :, slot], values[:, :, slot] = qk[:, self.num_heads :], qkv[:, rotated:]
            # grouped-query attention: query head j reads key/value head j // group, as repeat_kv
            scores = np.matmul(q.reshape(batch, self.num_kv_heads, group, self.head_dim),
                               keys[:, :, : slot + 1].swapaxes(-1, -2)) * scaling
            if self.mask is not None:
                scores += self.mask[..., : slot + 1]
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            attended = np.matmul(scores, values[:, :, : slot + 1]).reshape(batch, -1)
            x = x + o_proj(attended)
            g = gate(h := norm_2(x))
            x = x + down(g / (np.float32(1) + np.exp(-g)) * up(h))  # SiLU(gate) * up
            if index + 1 == self.hidden_layer:
                captured = x
        x = self.final_norm(x)
        if self.hidden_layer == self.num_layers:  # transformers' last hidden state is the final norm's output
            captured = x
        logits = self.head(x)
        self.length, self.steps = slot + 1, self.steps + 1
        return torch.from_numpy(logits), torch.from_numpy(x), torch.from_numpy(captured)


def _keep_spare(spare: list, stacks: list) -> None:
    if not spare:  # one set per LM: decoders alive at once do not leave a copy each behind
        spare.append(stacks)


def _has_foreign_hooks(module: torch.nn.Module) -> bool:
    # transformers' own output-recording hooks (installed at a first forward) only read outputs
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return "forward" in vars(module) or any(getattr(hook, "__module__", "") != "transformers.utils.output_capturing" for hook in hooks)


class _RMSNorm:
    """A Llama RMSNorm as numpy calls (np.mean's arithmetic without its Python layers)."""

    def __init__(self, module: torch.nn.Module):
        self.weight, self.eps = module.weight.detach().numpy(), float(module.variance_epsilon)
        self._eps, self._size = np.float32(self.eps), np.float32(self.weight.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.weight * (x / np.sqrt(np.add.reduce(x * x, axis=-1, keepdims=True) / self._size + self._eps))


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, half: int) -> np.ndarray:
    """transformers' `apply_rotary_pos_emb` for one position: x * cos + rotate_half(x) * sin."""
    return x * cos + np.concatenate((-x[..., half:], x[..., :half]), axis=-1) * sin


@torch.no_grad()
def fused_generate(
    model,
    decoder: NumpyLlamaDecoder,
    prompt_pass: Callable[[], object],
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    position_ids: torch.LongTensor,
    max_new_tokens: int,
    logits_processor: Callable[[torch.LongTensor, torch.Tensor], torch.Tensor],
    stopping_criteria: Callable[[torch.LongTensor, torch.Tensor], torch.BoolTensor],
    pad_token_id: int,
) -> tuple[torch.LongTensor, list[torch.Tensor]]:
    """transformers' greedy `generate` loop (the logits processors, argmax, finished rows padded, the
    stopping criteria; a sampling processor leaves one finite logit per row) with the cached steps run
    by `decoder`, for GILL's `model` (its `embed_tokens` and `compute_logits` around each step).
    `prompt_pass()` runs the model's forward over the prompt with a fresh `DynamicCache` and returns
    its output (`logits`, at least the last position's, and `cache`). Returns the sequences (prompt included) and, per step after the
    prompt, the `(batch, hidden)` hidden states of the decoder's `hidden_layer`, as
    `generate(output_hidden_states=True)` holds them."""
    out = prompt_pass()
    decoder.start(out.cache, attention_mask, position_ids[:, -1] + 1, max_new_tokens)
    logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
    sequences, step_states = input_ids, []
    for _ in range(max_new_tokens):
        scores = logits_processor(sequences, logits)
        tokens = scores.argmax(-1).masked_fill(~unfinished, pad_token_id)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        unfinished &= ~stopping_criteria(sequences, scores)
        if not unfinished.any() or sequences.shape[1] - input_ids.shape[1] == max_new_tokens:
            break
        model.check_sequence_length(sequences.shape[1])  # as the model's forward checks each step
        lm_logits, last_hidden, hidden = decoder.step(model.embed_tokens(tokens[:, None])[:, 0])
        step_states.append(hidden)
        logits = model.compute_logits(last_hidden, lm_logits)
    return sequences, step_states


__all__ = ["NumpyLlamaDecoder", "fused_generate"]
