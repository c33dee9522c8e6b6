"""GILL's decoding rules on top of transformers' KV-cached `generate`.

The reference re-runs the whole sequence at every step and appends all `[IMG]` tokens at once
when `[IMG0]` is chosen. Here the LM decodes one token per cached step; a `LogitsProcessor`
enforces GILL's rules (the 7 tokens after `[IMG0]` are forced, so a block is still appended
whole) and a final processor draws each row's token with that row's `torch.Generator`
(transformers' own sampling uses the global RNG). The `[IMG]` hidden states are read from the
cached passes; when a block ends the answer, one extra cached step feeds its last token. For a CPU
float32 Llama LM the cached steps run as one fused numpy function (`cpu_decode_gill`) in a copy of
`generate`'s loop, with the same processors and stopping criteria.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .cpu_blas_gill import numpy_blas_linears
from .cpu_decode_gill import NumpyLlamaDecoder, fused_generate

DECODING_MODES = ("default", "reference")


@dataclass
class GillDecodingOptions:
    """What `GillPipeline.__call__` passes to the decoder (validated there)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    min_word_tokens: int = 0
    ret_scale_factor: float = 1.0
    gen_scale_factor: float = 1.0
    force_image: bool = False
    max_images: int | None = None
    decoding: str = "default"
    # CPU float32 matmuls through numpy while decoding (`cpu_blas_gill`: its BLAS, and the streaming
    # kernel of `cpu_kernels_gill` for products of up to 8 rows where a C compiler built it; the pipeline's `numpy_blas`
    # attribute): same greedy tokens, ~1.8x the tokens/s where measured; False keeps torch's.
    numpy_blas: bool = True
    # With numpy's BLAS on, a Llama LM's cached steps run as one fused function (`cpu_decode_gill`: one
    # compiled call per step for one sequence where the C kernels were built, numpy calls otherwise)
    # instead of `generate`'s module calls (~2x the tokens/s where measured, same greedy tokens); the
    # prompt's pass is unchanged. Models it cannot reproduce decode with `generate` either way.
    fused_step: bool = True

    @property
    def reference(self) -> bool:
        return self.decoding == "reference"

    def token_limit(self, num_img_tokens: int) -> int:
        """The most tokens a decoding can feed through the LM after the prompt: a block counts once in
        reference mode, so up to `num_img_tokens` per step; +1 for the step that feeds a final block."""
        return self.max_new_tokens * (num_img_tokens if self.reference else 1) + 1

    @property
    def greedy(self) -> bool:
        # The reference's temperature 0 means greedy decoding.
        return not self.do_sample or (self.reference and self.temperature == 0)


@dataclass
class GillTokenIds:
    """The ids the rules need, from the model config and the tokenizer."""

    img_token_ids: list[int]
    image_token_id: int | None
    vocab_size: int  # tokenizer size: LM rows at or beyond it are padding rows
    eos_token_id: int | None
    pad_token_id: int
    newline_token_id: int | None


@dataclass
class _Row:
    generated: int = 0  # real tokens generated (pads after the end excluded)
    block_pos: int = 0  # [IMG] tokens of the block in progress (0: not inside a block)
    blocks: int = 0
    ref_steps: int = 0  # the reference's step count: a block counts once
    finished: bool = False
    extra: bool = False  # the next token only feeds the block that ends the answer; it is dropped
    tokens: list[int] = field(default_factory=list)


class GillDecodingState:
    """Per-row bookkeeping replayed from the generated ids; shared by the processors and the
    stopping criterion so they agree on where each row is."""

    def __init__(self, batch_size: int, prompt_length: int, options: GillDecodingOptions, ids: GillTokenIds):
        self.options, self.ids = options, ids
        self.prompt_length = prompt_length
        self.rows = [_Row() for _ in range(batch_size)]
        self._seen = prompt_length

    @property
    def num_img_tokens(self) -> int:
        return len(self.ids.img_token_ids)

    def budget_reached(self, row: _Row) -> bool:
        if self.options.reference:
            return row.ref_steps >= self.options.max_new_tokens and row.block_pos == 0
        return row.generated >= self.options.max_new_tokens

    def update(self, input_ids: torch.LongTensor) -> None:
        """Consumes the tokens appended since the last call (idempotent for the same length)."""
        if input_ids.shape[1] <= self._seen:
            return
        new = input_ids[:, self._seen :].tolist()
        self._seen = input_ids.shape[1]
        for row, tokens in zip(self.rows, new):
            for token in tokens:
                self._consume(row, token)

    def _consume(self, row: _Row, token: int) -> None:
        if row.finished:
            return
        if row.extra:
            row.finished = True
            return
        row.generated += 1
        row.tokens.append(token)
        img = self.ids.img_token_ids
        if row.block_pos > 0 or token == img[0]:
            if row.block_pos == 0:
                row.blocks += 1
                row.ref_steps += 1
            row.block_pos = (row.block_pos + 1) % len(img)
        else:
            row.ref_steps += 1
        if not self.options.reference and row.block_pos == 0 and token == self.ids.eos_token_id:
            row.finished = True
        elif self.budget_reached(row):
            # A block that ends the answer still needs its last token fed through the LM.
            if token == img[-1] and row.block_pos == 0:
                row.extra = True
            else:
                row.finished = True


class GillLogitsProcessor(LogitsProcessor):
    """GILL's candidate rules (the reference implementation's, and this package's default mode).

    In every mode: `[IMG1..7]` are never chosen on their own, after `[IMG0]` the rest of the block is
    forced, padding rows (ids >= the tokenizer size) are masked, `[IMG0]` is masked for the first
    `min_word_tokens` steps and otherwise scaled as the reference does (`|logit| * factor` for a
    factor > 1). Default mode also masks `<|image|>`, caps blocks at `max_images` and masks `[IMG0]`
    when a whole block no longer fits in `max_new_tokens`. `force_image` makes `[IMG0]` certain once
    `min_word_tokens` have passed and suppresses EOS and newline until a block exists.
    """

    def __init__(self, state: GillDecodingState, logits_width: int):
        self.state = state
        ids, options = state.ids, state.options
        self.img = torch.tensor(ids.img_token_ids)
        always = torch.zeros(logits_width, dtype=torch.bool)
        always[ids.img_token_ids[1:]] = True
        always[ids.vocab_size :] = True
        always[ids.img_token_ids[0]] = False  # an [IMG] id past the tokenizer size is still a real row
        if not options.reference and ids.image_token_id is not None:
            always[ids.image_token_id] = True
        self.always_masked = always
        self.stop_ids = [i for i in (ids.eos_token_id, ids.newline_token_id) if i is not None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        state, options = self.state, self.state.options
        state.update(input_ids)
        scores = scores.clone()
        img0 = state.ids.img_token_ids[0]
        n_img = state.num_img_tokens
        self.always_masked = self.always_masked.to(scores.device)
        for b, row in enumerate(state.rows):
            if row.finished or row.extra:
                continue
            if row.block_pos > 0:
                forced = state.ids.img_token_ids[row.block_pos]
                scores[b].fill_(float("-inf"))
                scores[b, forced] = 0.0
                continue
            scores[b].masked_fill_(self.always_masked, float("-inf"))
            step = row.ref_steps if options.reference else row.generated
            allow_img0 = step >= options.min_word_tokens
            if not options.reference:
                capped = options.max_images is not None and row.blocks >= options.max_images
                allow_img0 = allow_img0 and not capped and row.generated + n_img <= options.max_new_tokens
            if not allow_img0:
                scores[b, img0] = float("-inf")
                if options.force_image and row.blocks == 0:
                    scores[b, self.stop_ids] = float("-inf")
                continue
            for factor in (options.ret_scale_factor, options.gen_scale_factor):
                if factor > 1:  # the reference scales by |logit|, applied once per head
                    scores[b, img0] = scores[b, img0].abs() * factor
            if options.force_image and row.blocks == 0:
                scores[b].fill_(float("-inf"))
                scores[b, img0] = 0.0
        return scores


class GillRowSampler(LogitsProcessor):
    """The last processor: draws each row's token with that row's own generator (temperature, then
    the reference's nucleus filter) and leaves only that token finite, so generate's greedy argmax
    picks it. Forced, finished and extra steps draw nothing, so a row consumes the same random
    numbers alone as in a batch."""

    def __init__(self, state: GillDecodingState, generators: Sequence[torch.Generator | None]):
        self.state = state
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        options = self.state.options
        if options.greedy:
            return scores
        out = scores.clone()
        for b, row in enumerate(self.state.rows):
            if row.finished or row.extra or row.block_pos > 0:
                continue
            logits = scores[b].float() / options.temperature
            if options.top_p < 1.0:
                logits = _top_p_filter(logits, options.top_p)
            probs = logits.softmax(-1)
            generator = self.generators[b]
            device = generator.device if generator is not None else probs.device
            token = int(torch.multinomial(probs.to(device), 1, generator=generator))
            out[b].fill_(float("-inf"))
            out[b, token] = 0.0
        return out


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference's nucleus filter: keep the smallest prefix of sorted tokens whose probability
    reaches `top_p` (the token crossing the threshold included)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative > top_p
    remove[1:] = remove[:-1].clone()
    remove[0] = False
    return logits.masked_fill(torch.zeros_like(remove).scatter(0, sorted_indices, remove), float("-inf"))


class GillStoppingCriteria(StoppingCriteria):
    """Stops each row when the decoding state says it is finished (EOS in default mode, the token
    or step budget, one extra step after a block that ends the answer)."""

    def __init__(self, state: GillDecodingState, on_step: Callable[[], None] | None = None):
        self.state, self.on_step = state, on_step
        # generate pads finished rows only when some criterion carries an `eos_token_id`.
        self.eos_token_id = state.ids.pad_token_id

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.state.update(input_ids)
        if self.on_step is not None:
            self.on_step()
        return torch.tensor([row.finished for row in self.state.rows], device=input_ids.device)


@contextlib.contextmanager
def _neutral_generation_config(model) -> Iterator[None]:
    """generate fills unset options from `model.generation_config` (an EOS id, a repetition
    penalty...); GILL's rules own EOS and every logit change, so decode against a blank config."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@dataclass
class DecodedRow:
    token_ids: list[int]  # generated ids (prompt, final EOS, pads and the extra step excluded)
    block_starts: list[int]  # positions of [IMG0] in `token_ids`, block order
    img_hidden_states: torch.Tensor  # (n_blocks, num_img_tokens, hidden)


@torch.no_grad()
def gill_decode(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    pixel_values: torch.FloatTensor | None,
    options: GillDecodingOptions,
    ids: GillTokenIds,
    generators: Sequence[torch.Generator | None],
    on_step: Callable[[], None] | None = None,
) -> list[DecodedRow]:
    """KV-cached GILL decoding of a left-padded batch; returns each row's answer and the hidden
    states of its `[IMG]` blocks (read from the cached passes, the layer in `text_emb_layers`).
    `on_step` is called after each decoding step (a progress bar)."""
    batch, prompt_length = input_ids.shape
    n_img = len(ids.img_token_ids)
    state = GillDecodingState(batch, prompt_length, options, ids)
    limit = options.token_limit(n_img)
    # Left padding: positions count real tokens only, as for each prompt alone.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    rules = [GillLogitsProcessor(state, model.logits_width), GillRowSampler(state, generators)]
    stopping = StoppingCriteriaList([GillStoppingCriteria(state, on_step)])
    layer = model.config.text_emb_layers[0]
    # built before the block, whose routed layers carry their own forward
    decoder = NumpyLlamaDecoder.for_model(model.language_model, layer) if options.numpy_blas and options.fused_step else None
    with _neutral_generation_config(model), numpy_blas_linears(model, options.numpy_blas) as routed:
        if routed and decoder is not None:
            def prompt_pass():
                return model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, position_ids=position_ids,
                             cache=DynamicCache(config=model.config.text_config), use_cache=True, logits_to_keep=1)

            sequences, step_states = fused_generate(
                model, decoder, prompt_pass, input_ids, attention_mask, position_ids,
                limit, _in_turn(rules), stopping, ids.pad_token_id)
        else:
            generation_config = GenerationConfig(
                max_new_tokens=limit, do_sample=False, num_beams=1, pad_token_id=ids.pad_token_id,
                eos_token_id=None, output_hidden_states=True, return_dict_in_generate=True, use_cache=True,
            )
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, position_ids=position_ids,
                generation_config=generation_config, logits_processor=LogitsProcessorList(rules), stopping_criteria=stopping,
            )
            # hidden_states[s] holds the pass that fed generated token s - 1 (s = 0 is the prompt).
            sequences, step_states = out.sequences, [step[layer][:, -1] for step in out.hidden_states[1:]]
    state.update(sequences)
    rows = []
    for b, row in enumerate(state.rows):
        tokens = list(row.tokens)
        if tokens and not options.reference and tokens[-1] == ids.eos_token_id:
            tokens = tokens[:-1]
        if options.reference:
            tokens = _reference_cut(tokens, ids, options)
        starts = _block_starts(tokens, ids.img_token_ids)
        hidden = [torch.stack([step_states[s][b] for s in range(j, j + n_img)]) for j in starts]
        empty = torch.empty(0, n_img, model.config.text_config.hidden_size, dtype=model.language_model.dtype)
        rows.append(DecodedRow(tokens, starts, torch.stack(hidden) if hidden else empty.to(input_ids.device)))
    return rows


def _in_turn(processors: Sequence[LogitsProcessor]) -> Callable[[torch.LongTensor, torch.Tensor], torch.Tensor]:
    """The processors applied in turn, as `LogitsProcessorList` applies processors of `(input_ids,
    scores)` alone, without its signature inspection at every call (~0.1 ms a token, measured)."""
    def apply(input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in processors:
            scores = processor(input_ids, scores)
        return scores
    return apply


def _block_starts(tokens: list[int], img_token_ids: list[int]) -> list[int]:
    n = len(img_token_ids)
    return [j for j in range(len(tokens) - n + 1) if tokens[j : j + n] == img_token_ids]


def _reference_cut(tokens: list[int], ids: GillTokenIds, options: GillDecodingOptions) -> list[int]:
    """The reference cuts its answer at the first newline (unless that newline comes first)
    and reads only the first `max_num_rets` blocks; text from the next block on is dropped here so
    that every `<image>` in the text has its images."""
    if ids.newline_token_id is not None and ids.newline_token_id in tokens:
        first = tokens.index(ids.newline_token_id)
        if first > 0:  # the reference's `trunc_idx > 0`: a leading newline cuts nothing
            tokens = tokens[:first]
    limit = 1 if options.max_images is None else options.max_images
    starts = _block_starts(tokens, ids.img_token_ids)
    if len(starts) > limit:
        tokens = tokens[: starts[limit]]
    return tokens


def truncate_caption(text: str) -> str:
    """The reference's cut of an answer's text: outer newlines stripped, then up to and including the
    first newline if there is one, else up to and including the first '.'."""
    text = text.strip("\n")
    cut = text.find("\n") + 1
    if cut <= 0:
        cut = text.find(".") + 1
    return text[:cut] if cut > 0 else text


def answer_text(processor, token_ids: list[int], reference: bool) -> str:
    """An answer's text with `<image>` where each block stood. A generated `<|image|>` id is dropped
    (the reference decodes with `skip_special_tokens=True`; it stands for no image). In reference
    mode the text before each block (or the whole answer, without one) gets `truncate_caption`,
    and text after the last block is dropped, as the reference returns it."""
    n_img = len(processor.img_token_ids)
    token_ids = [t for t in token_ids if t != processor.image_token_id]
    if not reference:
        return processor.decode(token_ids)
    starts = _block_starts(token_ids, processor.img_token_ids)
    if not starts:
        return truncate_caption(processor.tokenizer.decode(token_ids, skip_special_tokens=True))
    parts, previous = [], 0
    for start in starts:
        text = truncate_caption(processor.tokenizer.decode(token_ids[previous:start], skip_special_tokens=True)).strip()
        parts += ([text] if text else []) + ["<image>"]
        previous = start + n_img
    return " ".join(parts)


__all__ = [
    "DECODING_MODES",
    "answer_text",
    "truncate_caption",
    "DecodedRow",
    "GillDecodingOptions",
    "GillDecodingState",
    "GillLogitsProcessor",
    "GillRowSampler",
    "GillStoppingCriteria",
    "GillTokenIds",
    "gill_decode",
]
