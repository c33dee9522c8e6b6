"""The two LM passes of GILL's training forward, built from `[BOS caption [IMG0..7] pad]` rows as
the reference implementation builds them, and the pieces of its losses.

A pass row is a *piece*: `(embeds, labels, body_end, bos_position, img_block_start)`; `body_end`
splits the example from its tail (what follows the caption or the block), which the reference's
two-caption concatenation moves behind the concatenated pair.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .outputs_gill import GillOutput

IGNORE_INDEX = -100

Piece = tuple[torch.Tensor, torch.LongTensor, int, int, int | None]


def img_block_starts(input_ids: torch.LongTensor, img_token_ids: list[int]) -> list[int]:
    """Position of the `[IMG0..7]` block in each training row (it ends the row's real tokens)."""
    n_img = len(img_token_ids)
    starts = []
    for row, ids in enumerate(input_ids.tolist()):
        if img_token_ids[0] not in ids:
            raise ValueError(f"`input_ids` row {row} has no [IMG] block; training rows are `[BOS caption [IMG0..{n_img - 1}] pad]`.")
        start = ids.index(img_token_ids[0])
        if ids[start : start + n_img] != list(img_token_ids):
            raise ValueError(f"`input_ids` row {row} has an incomplete [IMG] block at position {start}.")
        starts.append(start)
    return starts


def draw_concat(concat_captions: bool | float) -> bool:
    """`True`/`False` decide; a probability draws (torch's RNG, so a seeded run repeats)."""
    if isinstance(concat_captions, bool):
        return concat_captions
    if not 0.0 <= concat_captions <= 1.0:
        raise ValueError(f"`concat_captions` must be a bool or a probability in [0, 1], got {concat_captions!r}.")
    return bool(torch.rand(()) < concat_captions)


def caption_piece(prefix: torch.Tensor, token_embeds: torch.Tensor, ids: torch.LongTensor, start: int) -> Piece:
    """Captioning pass row: `[visual prefix, BOS caption | [IMG] block and pads]`; labels cover
    BOS + caption."""
    n_vis = prefix.shape[0]
    labels = torch.full((n_vis + len(ids),), IGNORE_INDEX, dtype=torch.long, device=ids.device)
    labels[n_vis : n_vis + start] = ids[:start]
    return torch.cat([prefix, token_embeds]), labels, n_vis + start, n_vis, None


def text_piece(token_embeds: torch.Tensor, ids: torch.LongTensor, start: int, num_img_tokens: int, first_label: int = 0) -> Piece:
    """Text pass row: `[BOS caption [IMG0..7] | pads]`; labels cover everything from `first_label`
    (0; for an interleaved row, the position after its last image) to the pads (`mask_after_img0`
    then keeps the text + `[IMG0]`)."""
    body = start + num_img_tokens
    labels = torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long, device=ids.device)
    labels[first_label:body] = ids[first_label:body]
    return token_embeds, labels, body, 0, start


def text_label_starts(input_ids: torch.LongTensor, image_token_id: int | None) -> list[int]:
    """Per row, where the text CE starts: after the row's last `<|image|>` placeholder (an
    interleaved row is captioned from its last image on, as the captioning pass does), else 0."""
    if image_token_id is None:
        return [0] * input_ids.shape[0]
    starts = []
    for ids in input_ids.tolist():
        last = max((i for i, token in enumerate(ids) if token == image_token_id), default=-1)
        starts.append(last + 1)
    return starts


def stack_pass(pieces: list[Piece], concat: bool, bos_token_id: int | None):
    """Stacks pass rows, or concatenates consecutive pairs as the reference does:
    `[body_1, body_2 without its BOS, tail_1, tail_2]` (the second row's visual prefix, if any,
    stays in front of its caption). Returns embeds, labels and the `(row, position)` of every
    example's `[IMG]` block."""
    if not concat:
        embeds = torch.stack([p[0] for p in pieces])
        labels = torch.stack([p[1] for p in pieces])
        return embeds, labels, [(i, p[4]) for i, p in enumerate(pieces)]
    if len(pieces) % 2:
        raise ValueError(f"Caption concatenation pairs examples: the batch size must be even, got {len(pieces)}.")
    rows_embeds, rows_labels, blocks = [], [], []
    for pair in range(len(pieces) // 2):
        (e1, l1, body1, _, blk1), (e2, l2, body2, bos2, blk2) = pieces[2 * pair], pieces[2 * pair + 1]
        drop = bos2 + int(body2 > bos2 and l2[bos2].item() == bos_token_id)
        keep2 = torch.cat([torch.arange(bos2), torch.arange(drop, body2)]).to(e2.device)
        rows_embeds.append(torch.cat([e1[:body1], e2[keep2], e1[body1:], e2[body2:]]))
        rows_labels.append(torch.cat([l1[:body1], l2[keep2], l1[body1:], l2[body2:]]))
        if blk1 is not None:
            blocks += [(pair, blk1), (pair, body1 + blk2 - (drop - bos2))]
    return torch.stack(rows_embeds), torch.stack(rows_labels), blocks


def training_forward(model, input_ids, pixel_values=None, image_features=None, gen_targets=None, concat_captions=False,
                     context_pixel_values=None, context_image_features=None, interleaved=None, paired=None,
                     gen_pooled_targets=None):
    """GILL's training forward (see `GillForConditionalGeneration.forward`): the captioning pass over
    caption rows, one text pass over every row, and the four losses. Returns a `GillOutput`."""
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError("`input_ids` must be a non-empty (batch, length) tensor of training rows.")
    config = model.config
    batch, n_img = input_ids.shape[0], config.num_img_tokens
    interleaved = _row_mask(interleaved, batch, "interleaved", input_ids.device, default=False)
    starts = img_block_starts(input_ids, config.img_token_ids)
    bos_token_id = config.text_config.bos_token_id
    has_images = pixel_values is not None or image_features is not None
    paired = _row_mask(paired, batch, "paired", input_ids.device, default=has_images)
    if paired.any() and not has_images:
        raise ValueError("`paired` marks rows with an image but no `pixel_values` / `image_features` were given.")
    features = model._image_features(pixel_values, image_features) if has_images else None
    if features is not None and features.shape[0] != batch:
        raise ValueError(f"Got {features.shape[0]} images for {batch} `input_ids` rows (one paired image per row).")
    if gen_targets is not None and gen_targets.shape != (batch, config.num_clip_tokens, config.gen_emb_dim):
        raise ValueError(
            f"`gen_targets` must be ({batch}, {config.num_clip_tokens}, {config.gen_emb_dim}), got {tuple(gen_targets.shape)}."
        )
    if config.pooled_emb_dim is not None and gen_targets is not None and (
            gen_pooled_targets is None or gen_pooled_targets.shape != (batch, config.pooled_emb_dim)):
        got = None if gen_pooled_targets is None else tuple(gen_pooled_targets.shape)
        raise ValueError(f"A {config.decoder_family!r} decoder's targets include `gen_pooled_targets` ({batch}, "
                         f"{config.pooled_emb_dim}); got {got}.")
    has_context = bool((input_ids == config.image_token_id).any()) if config.image_token_id is not None else False
    if has_context and not interleaved[(input_ids == config.image_token_id).any(-1)].all():
        raise ValueError("Rows with `<|image|>` placeholders are interleaved examples: mark them in `interleaved`.")
    token_embeds = model.embed_prompt(input_ids, context_pixel_values, context_image_features)
    out = GillOutput()
    # The reference's two-caption concatenation pairs caption rows; a batch with interleaved rows is not concatenated.
    concat_allowed = not bool(interleaved.any())

    captioned = [i for i in range(batch) if paired[i] and not interleaved[i]]
    if features is not None and captioned:
        prefix = model.get_visual_prefix(image_features=features[captioned]).to(token_embeds.dtype)
        pieces = [caption_piece(prefix[j], token_embeds[i], input_ids[i], starts[i]) for j, i in enumerate(captioned)]
        embeds, labels, _ = stack_pass(pieces, concat_allowed and draw_concat(concat_captions), bos_token_id)
        outputs, _ = model._run_lm(embeds)
        out.caption_logits = model.compute_logits(outputs.hidden_states[-1], outputs.logits)
        out.caption_labels = labels
        out.caption_loss = causal_lm_loss(out.caption_logits, labels)

    first_labels = text_label_starts(input_ids, config.image_token_id)
    pieces = [text_piece(token_embeds[i], input_ids[i], starts[i], n_img, first_labels[i]) for i in range(batch)]
    embeds, labels, block_positions = stack_pass(pieces, concat_allowed and draw_concat(concat_captions), bos_token_id)
    outputs, emb_layer_states = model._run_lm(embeds)
    out.text_logits = model.compute_logits(outputs.hidden_states[-1], outputs.logits)
    out.text_labels = mask_after_img0(labels, model.img_token_ids[1:])
    out.text_loss = causal_lm_loss(out.text_logits, out.text_labels)
    out.img_hidden_states = torch.stack([emb_layer_states[row, pos : pos + n_img] for row, pos in block_positions])
    if features is not None and paired.any():
        rows = paired.nonzero().squeeze(1)
        out.text_embeds = model.get_text_retrieval_embeds(out.img_hidden_states[rows])
        out.image_embeds = model.get_image_retrieval_embeds(image_features=features[rows])
        mode = config.contrastive_gather
        image_side, text_side = gather_across_processes(out.image_embeds, mode), gather_across_processes(out.text_embeds, mode)
        out.logits_per_image = model.logit_scale.exp() * image_side @ text_side.T
        out.contrastive_loss = symmetric_info_nce(out.logits_per_image)
    if gen_targets is not None:
        conditioning = model.get_decoder_conditioning(out.img_hidden_states)
        out.prompt_embeds = conditioning["prompt_embeds"]
        out.pooled_prompt_embeds = conditioning.get("pooled_prompt_embeds")
        out.gen_loss, out.gen_pooled_loss = generation_loss(conditioning, gen_targets, gen_pooled_targets,
                                                            config.pooled_loss_scale)

    scaled = [
        (out.caption_loss, config.caption_loss_scale),
        (out.text_loss, config.text_loss_scale),
        (out.contrastive_loss, config.contrastive_loss_scale),
        (out.gen_loss, config.gen_loss_scale),
    ]
    out.loss = sum(value * scale for value, scale in scaled if value is not None)
    return out


def _row_mask(mask, batch: int, name: str, device, default: bool) -> torch.Tensor:
    if mask is None:
        return torch.full((batch,), default, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (batch,):
        raise ValueError(f"`{name}` must be a ({batch},) bool tensor, one flag per row, got shape {tuple(mask.shape)}.")
    return mask.bool()


def mask_after_img0(labels: torch.LongTensor, later_img_ids: torch.LongTensor) -> torch.LongTensor:
    """The text pass keeps caption + `[IMG0]`: everything from the first `[IMG1..]` on is masked
    (for a concatenated pair the reference thereby masks the second caption too)."""
    return labels.masked_fill(torch.isin(labels, later_img_ids).cumsum(-1) > 0, IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose label is not -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def symmetric_info_nce(logits_per_image: torch.Tensor) -> torch.Tensor:
    """(CE over texts per image + CE over images per text) / 2, the matching pairs on the diagonal."""
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image.float(), targets) + F.cross_entropy(logits_per_image.T.float(), targets)) / 2


def per_token_l2_distance(prompt_embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over examples and positions of the L2 distance (not squared) per token."""
    return (prompt_embeds.float() - targets.float()).pow(2).sum(-1).sqrt().mean()


def generation_loss(conditioning: dict[str, torch.Tensor], gen_targets: torch.Tensor,
                    gen_pooled_targets: torch.Tensor | None = None, pooled_loss_scale: float = 1.0):
    """GILL's generation loss on the mapper's output (`get_decoder_conditioning`): the per-token L2
    distance to `gen_targets`, plus `pooled_loss_scale` x the L2 distance of the pooled vector for
    decoders with one. Returns `(gen_loss, pooled part or None)`."""
    loss = per_token_l2_distance(conditioning["prompt_embeds"], gen_targets)
    if "pooled_prompt_embeds" not in conditioning:
        return loss, None
    pooled = (conditioning["pooled_prompt_embeds"].float() - gen_pooled_targets.float()).pow(2).sum(-1).sqrt().mean()
    return loss + pooled_loss_scale * pooled, pooled


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward returns to each process the gradient of its slice summed over every
    process's loss (each process's loss reads every slice). Slices must have equal sizes."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_across_processes(tensor: torch.Tensor, mode: str = "reference") -> torch.Tensor:
    """All-gathers along the batch so contrastive negatives span every process. `"reference"`: only
    the local slice keeps its gradient (the reference's loop; under DDP's averaging the contrastive
    gradient is 1/world of a single process's on the whole batch). `"autograd"`: gradients flow back
    to every slice's process, so DDP's average equals the single-process gradient on the concatenated
    batch (equal per-process batches)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if mode == "autograd":
        return _GatherWithGradient.apply(tensor.contiguous())
    gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    gathered[dist.get_rank()] = tensor
    return torch.cat(gathered)
