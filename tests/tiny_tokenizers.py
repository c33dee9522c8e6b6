"""Tiny tokenizers and an image processor built in code, for offline tests.

Each tokenizer is trained with the `tokenizers` library on a small fixed corpus (a few hundred
sentences, vocabulary of at most 300) and reproduces the special-token layout of a real family:

- `opt_like_tokenizer`: OPT's byte-level BPE (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3,
  bos = eos = `</s>`, BOS added automatically), loaded as `GPT2Tokenizer` from vocab.json/merges.txt.
- `gpt2_like_tokenizer`: GPT-2's byte-level BPE (a single `<|endoftext|>` as the LAST id, used for
  unk/bos/eos, no pad token, no automatic BOS).
- `llama_like_tokenizer`: Llama's Metaspace BPE (`<unk>`=0, `<s>`=1, `</s>`=2, BOS added
  automatically, no pad token).

Training runs once per session (cached); every call returns a fresh tokenizer, because
`GillProcessor` adds tokens to the tokenizer it is given.
"""

import functools
import json
import os
import tempfile

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, GPT2Tokenizer, LlamaTokenizer


VOCAB_SIZE = 300

_SUBJECTS = ["a dog", "the cat", "a red car", "two birds", "an old man", "the small house", "a girl", "my friend"]
_VERBS = ["runs across", "sits on", "looks at", "stands near", "jumps over", "walks along", "sleeps under"]
_OBJECTS = ["the park", "a wooden table", "the beach", "a green field", "the river", "a busy street"]
_ENDINGS = [".", " at night.", " in the morning.", "!", "?", ", smiling.", " in the rain."]


def _corpus() -> list[str]:
    """A few hundred deterministic caption-like sentences (8 x 7 x 6 combinations, 336 lines)."""
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, verb in enumerate(_VERBS):
            for k, obj in enumerate(_OBJECTS):
                ending = _ENDINGS[(i + j + k) % len(_ENDINGS)]
                lines.append(f"{subject.capitalize()} {verb} {obj}{ending}")
    return lines + ["Q: What is this?\nA: A picture of a dog.", "Draw it at night. Now show me another one."]


@functools.cache
def _train_bpe(flavour: str, special_tokens: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Trains a BPE on the corpus; `special_tokens` take the first ids, in order.

    `flavour` "byte_level" is GPT-2's (bytes mapped to printable characters, `Ġ` for spaces);
    "metaspace" is sentencepiece-like as in Llama (`▁` for spaces, unknown characters -> `<unk>`).
    """
    if flavour == "byte_level":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(special_tokens), initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def _save_vocab_and_merges(directory: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges))


def opt_like_tokenizer(tmp_path: str | os.PathLike | None = None) -> GPT2Tokenizer:
    """OPT's layout: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, bos = eos = `</s>`, BOS prepended."""
    vocab, merges = _train_bpe("byte_level", ("<s>", "<pad>", "</s>", "<unk>"))
    directory = os.path.join(tmp_path or tempfile.mkdtemp(), "opt_like_tokenizer")
    _save_vocab_and_merges(directory, vocab, merges)
    return GPT2Tokenizer.from_pretrained(
        directory,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def gpt2_like_tokenizer(tmp_path: str | os.PathLike | None = None) -> GPT2Tokenizer:
    """GPT-2's layout: one `<|endoftext|>` (unk/bos/eos) as the last id, no pad, no automatic BOS."""
    vocab, merges = _train_bpe("byte_level", ())
    vocab = {**vocab, "<|endoftext|>": len(vocab)}
    directory = os.path.join(tmp_path or tempfile.mkdtemp(), "gpt2_like_tokenizer")
    _save_vocab_and_merges(directory, vocab, merges)
    return GPT2Tokenizer.from_pretrained(directory)


def llama_like_tokenizer(tmp_path: str | os.PathLike | None = None) -> LlamaTokenizer:
    """Llama's layout: `<unk>`=0, `<s>`=1 (prepended), `</s>`=2, no pad token.

    `tmp_path` is accepted for symmetry with the other builders; this one needs no files.
    """
    vocab, merges = _train_bpe("metaspace", ("<unk>", "<s>", "</s>"))
    # Copies, so that no tokenizer can alter the cached training result.
    return LlamaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False)


def tiny_image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing (bicubic shortest side, centre crop, CLIP mean/std) at 32x32."""
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
