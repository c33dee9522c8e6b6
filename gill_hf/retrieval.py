"""GillRetrievalIndex: normalised image embeddings (memory-mapped safetensors) plus references to
the images (paths, URLs or rows of a `datasets.Dataset`), searched exactly by cosine similarity.

It is a diffusers `ModelMixin`, so `GillPipeline.save_pretrained`/`from_pretrained` carry it as a
component; its own `save_pretrained`/`from_pretrained` keep the embeddings memory-mapped instead
of loading them as parameters. Images are decoded only when `get_image` asks for one.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import save_file

from .modeling.checkpointing import atomic_directory

EMBEDDINGS_NAME = "embeddings.safetensors"
REFERENCES_NAME = "references.jsonl"
DATASET_DIR = "dataset"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_SAFETENSORS_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16)}
# A 16-bit scan can misjudge a cosine by ~1e-3 (the query's and the score's rounding): every entry
# within this margin of the k-th best is re-scored in float32.
_LOW_PRECISION_MARGIN = 1e-2
_SHORTLIST = 256  # extra candidates a 16-bit scan keeps for exact re-scoring
_SEARCH_SCORES = 1 << 26  # float32 scores per matmul (256 MiB): bounds the working set of batched queries


class GillRetrievalIndex(ModelMixin, ConfigMixin):
    r"""
    Exact top-k retrieval over L2-normalised image embeddings (GILL's image retrieval head).

    Args:
        embedding_dim (`int`): width of the embeddings (`GillConfig.ret_emb_dim`).
        image_column (`str`, defaults to `"image"`): column of a dataset-backed index holding the images.

    Build one with [`~GillRetrievalIndex.build`] (from a `datasets.Dataset` or an image folder) or
    [`~GillRetrievalIndex.from_embeddings`].
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, embedding_dim: int = 256, image_column: str = "image"):
        super().__init__()
        self.embeddings = torch.empty(0, embedding_dim)  # a plain attribute: never a parameter, never copied by `.to`
        self._references: list[str] | None = []
        self._references_file: Path | None = None  # parsed on first use: loading stays fast for millions of entries
        self.dataset = None
        # Follows the pipeline's `.to(device)`; search runs there (the embeddings are copied once).
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self._device_embeddings: torch.Tensor | None = None

    # ----- construction ------------------------------------------------------------------------

    @classmethod
    def from_embeddings(
        cls, embeddings: torch.Tensor, references: Sequence[str] | None = None, dataset=None, image_column: str = "image"
    ) -> GillRetrievalIndex:
        """An index over `embeddings` `(n, dim)` (normalised here), whose images are `references`
        (paths or URLs, one per row) or the rows of `dataset`."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
            raise ValueError(f"`embeddings` must be a (n, dim) tensor, got {getattr(embeddings, 'shape', type(embeddings))}.")
        if (references is None) == (dataset is None):
            raise ValueError("Pass exactly one of `references` (paths or URLs) and `dataset`.")
        count = len(references) if references is not None else len(dataset)
        if count != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {count} images.")
        index = cls(embedding_dim=embeddings.shape[1], image_column=image_column)
        index.embeddings = F.normalize(embeddings.detach().float(), dim=-1).to(embeddings.dtype).cpu().contiguous()
        index.references = list(references) if references is not None else None
        index.dataset = dataset
        return index

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        source,
        processor,
        batch_size: int = 32,
        image_column: str = "image",
        dtype: torch.dtype = torch.float32,
    ) -> GillRetrievalIndex:
        r"""
        Embeds every image of `source` with the model's image retrieval head, `batch_size` at a time.

        Args:
            model ([`GillForConditionalGeneration`]): provides `get_image_retrieval_embeds`.
            source (`datasets.Dataset` or folder path): a dataset with an `image_column`, or a folder
                whose image files (sorted by name) are indexed by absolute path.
            processor ([`GillProcessor`] or an image processor): CLIP preprocessing.
            batch_size (`int`): images per forward pass.
            dtype (`torch.dtype`): storage dtype (float32, float16 or bfloat16).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
        image_processor = getattr(processor, "image_processor", processor)
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if not folder.is_dir():
                raise ValueError(f"`source` {str(source)!r} is not a folder.")
            references = [str(p.resolve()) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not references:
                raise ValueError(f"`source` {str(source)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
            batches = (_open_images(references[i : i + batch_size]) for i in range(0, len(references), batch_size))
            dataset = None
        elif hasattr(source, "column_names"):
            if image_column not in source.column_names:
                raise ValueError(f"The dataset has no column {image_column!r} (columns: {source.column_names}).")
            if len(source) == 0:
                raise ValueError("`source` is an empty dataset.")
            batches = (source[i : i + batch_size][image_column] for i in range(0, len(source), batch_size))
            references, dataset = None, source
        else:
            raise TypeError(f"`source` is a {type(source).__name__}; expected a datasets.Dataset or a folder path.")
        device = next(model.parameters()).device
        chunks = []
        for images in batches:
            pixels = image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
            chunks.append(model.get_image_retrieval_embeds(pixel_values=pixels.to(device)).float().cpu())
        return cls.from_embeddings(torch.cat(chunks).to(dtype), references=references, dataset=dataset, image_column=image_column)

    @property
    def references(self) -> list[str] | None:
        """Image paths or URLs, one per entry (None for a dataset-backed index)."""
        if self._references is None and self._references_file is not None:
            with open(self._references_file, encoding="utf-8") as f:
                self._references = [json.loads(line)["path"] for line in f if line.strip()]
        return self._references

    @references.setter
    def references(self, value: list[str] | None) -> None:
        self._references, self._references_file = value, None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    # ----- search -------------------------------------------------------------------------------

    @torch.no_grad()
    def search(
        self, query: torch.Tensor, k: int = 3, exclude: Iterable[int] | Sequence[Iterable[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Exact top-`k` by cosine similarity against the stored embeddings, scored in float32. A
        16-bit index is scanned in its own dtype (half the memory traffic of upcasting it) and its
        best candidates re-scored in float32, so the result is the float32 one.

        Args:
            query (`torch.Tensor`): `(dim,)` or `(n, dim)`; normalised here.
            k (`int`): candidates per query.
            exclude: indices never returned: one iterable for every query, or one per query.

        Returns:
            `(scores, indices)`, each `(n, k)` (or `(k,)` for a 1-D query), best first. When fewer than
            `k` entries remain, the missing places hold score `-inf` and index `-1`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be an int >= 1, got {k!r}.")
        single = query.ndim == 1
        query = query[None] if single else query
        if query.ndim != 2 or query.shape[1] != self.config.embedding_dim:
            raise ValueError(f"`query` must be (n, {self.config.embedding_dim}) or ({self.config.embedding_dim},), got {tuple(query.shape)}.")
        embeddings = self._search_embeddings()
        query = F.normalize(query.detach().float(), dim=-1).to(embeddings.device)
        excluded = self._exclusions(exclude, query.shape[0])
        n = embeddings.shape[0]
        chunk = max(1 << 16, _SEARCH_SCORES // query.shape[0])  # one matmul for a single query up to 64 M entries
        best_scores = torch.full((query.shape[0], 0), float("-inf"), device=query.device)
        best_indices = torch.zeros((query.shape[0], 0), dtype=torch.long, device=query.device)
        for start in range(0, n, chunk):
            block = embeddings[start : start + chunk]
            banned = [[i - start for i in row if start <= i < start + block.shape[0]] for row in excluded]
            values, indices = _exact_top_k(query, block, k, banned)
            merged_scores = torch.cat([best_scores, values], dim=1)
            merged_indices = torch.cat([best_indices, indices + start], dim=1)
            keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=-1).indices
            best_scores, best_indices = merged_scores.gather(1, keep), merged_indices.gather(1, keep)
        if best_scores.shape[1] < k:  # fewer entries than k
            pad = k - best_scores.shape[1]
            best_scores = F.pad(best_scores, (0, pad), value=float("-inf"))
            best_indices = F.pad(best_indices, (0, pad), value=-1)
        best_indices = best_indices.masked_fill(best_scores == float("-inf"), -1)
        return (best_scores[0], best_indices[0]) if single else (best_scores, best_indices)

    def _search_embeddings(self) -> torch.Tensor:
        device = self._anchor.device
        if device.type == "cpu":
            return self.embeddings
        if self._device_embeddings is None or self._device_embeddings.device != device:
            self._device_embeddings = self.embeddings.to(device)
        return self._device_embeddings

    @staticmethod
    def _exclusions(exclude, n_queries: int) -> list[list[int]]:
        if exclude is None:
            return [[] for _ in range(n_queries)]
        exclude = list(exclude)
        if exclude and all(isinstance(e, Iterable) and not isinstance(e, (str, bytes)) for e in exclude):
            if len(exclude) != n_queries:
                raise ValueError(f"`exclude` holds {len(exclude)} lists for {n_queries} queries.")
            return [[int(i) for i in e] for e in exclude]
        return [[int(i) for i in exclude] for _ in range(n_queries)]

    # ----- images -------------------------------------------------------------------------------

    def get_image(self, index: int) -> PIL.Image.Image:
        """Decodes one indexed image (from its dataset row, file or URL) as RGB."""
        if not 0 <= index < len(self):
            raise IndexError(f"Image index {index} is outside the index (size {len(self)}).")
        if self.dataset is not None:
            return self.dataset[int(index)][self.config.image_column].convert("RGB")
        reference = self.references[index]
        if reference.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(reference, timeout=30) as response:  # only the retrieved image is fetched
                return PIL.Image.open(io.BytesIO(response.read())).convert("RGB")
        with PIL.Image.open(reference) as image:
            return image.convert("RGB")

    # ----- save / load --------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Writes `config.json`, `embeddings.safetensors` and `references.jsonl` (or the dataset as
        an arrow table under `dataset/`), atomically."""
        with atomic_directory(save_directory) as staging:
            self.save_config(staging)
            save_file({"embeddings": self.embeddings.contiguous()}, str(staging / EMBEDDINGS_NAME), metadata={"format": "pt"})
            if self.dataset is not None:
                self.dataset.save_to_disk(str(staging / DATASET_DIR))
            with open(staging / REFERENCES_NAME, "w", encoding="utf-8") as f:
                for i in range(len(self)):
                    entry = {"row": i} if self.dataset is not None else {"path": self.references[i]}
                    f.write(json.dumps(entry) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs) -> GillRetrievalIndex:
        """Loads an index saved by `save_pretrained`; the embeddings stay memory-mapped (read-only
        pages are shared with the file, nothing is copied until searched on an accelerator)."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained_model_name_or_path), **{k: kwargs[k] for k in ("revision", "cache_dir", "token") if k in kwargs}))
        folder = folder / subfolder if subfolder else folder
        for name in (cls.config_name, EMBEDDINGS_NAME, REFERENCES_NAME):
            if not (folder / name).is_file():
                raise ValueError(f"The retrieval index at {str(folder)!r} lacks {name!r}.")
        index = cls.from_config(cls.load_config(folder))
        index.embeddings = _mmap_tensor(folder / EMBEDDINGS_NAME, "embeddings")
        if index.embeddings.ndim != 2 or index.embeddings.shape[1] != index.config.embedding_dim:
            raise ValueError(f"{str(folder / EMBEDDINGS_NAME)!r} holds a tensor of shape {tuple(index.embeddings.shape)}, expected (n, {index.config.embedding_dim}).")
        raw = (folder / REFERENCES_NAME).read_bytes()
        count = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
        if count != len(index):
            raise ValueError(f"{str(folder / REFERENCES_NAME)!r} has {count} entries for {len(index)} embeddings (truncated?).")
        if (folder / DATASET_DIR).is_dir():
            import datasets

            index.dataset, index.references = datasets.load_from_disk(str(folder / DATASET_DIR)), None
        else:
            index._references, index._references_file = None, folder / REFERENCES_NAME
        return index


def _open_images(paths: Sequence[str]) -> list[PIL.Image.Image]:
    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def _exact_top_k(query: torch.Tensor, embeddings: torch.Tensor, k: int, banned: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top `k` (values, local indices) of float32 cosine scores, skipping each row's `banned`.
    A 16-bit `embeddings` is scanned in its own dtype for single queries (half the memory traffic
    of upcasting it); the scan's best candidates, every entry within `_LOW_PRECISION_MARGIN` of its
    k-th best included, are then re-scored in float32, so the result is the float32 one."""
    k = min(k, embeddings.shape[0])
    if embeddings.dtype == torch.float32 or query.shape[0] > 1:  # a batch amortises the upcast
        scores = query @ embeddings.float().T
        for row, local in enumerate(banned):
            scores[row, local] = float("-inf")
        top = scores.topk(k, dim=-1)
        return top.values, top.indices
    coarse = (query.to(embeddings.dtype) @ embeddings.T).float()[0]
    coarse[banned[0]] = float("-inf")
    shortlist = coarse.topk(min(coarse.shape[0], k + _SHORTLIST))
    threshold = shortlist.values[k - 1] - _LOW_PRECISION_MARGIN
    candidates = shortlist.indices
    if candidates.shape[0] < coarse.shape[0] and shortlist.values[-1] >= threshold:
        candidates = (coarse >= threshold).nonzero().squeeze(1)  # the shortlist may miss some: take all
    candidates = candidates[coarse[candidates] > float("-inf")]
    exact = query[0] @ embeddings[candidates].float().T
    best = exact.topk(min(k, exact.shape[0]))
    values = torch.full((1, k), float("-inf"), device=query.device)
    indices = torch.full((1, k), -1, dtype=torch.long, device=query.device)
    values[0, : best.values.shape[0]], indices[0, : best.values.shape[0]] = best.values, candidates[best.indices]
    return values, indices


def _mmap_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped (copy-on-write, so torch gets a writable
    array without ever writing to the file)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{str(file)!r} is not a safetensors file (truncated header).")
        header_size = struct.unpack("<Q", raw)[0]
        try:
            header = json.loads(f.read(header_size))
        except ValueError as error:
            raise ValueError(f"{str(file)!r} has a corrupt safetensors header: {error}") from error
    if key not in header:
        raise ValueError(f"{str(file)!r} has no tensor {key!r}.")
    info = header[key]
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{str(file)!r}: tensor {key!r} has dtype {info['dtype']}; expected F32, F16 or BF16.")
    np_dtype, torch_dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    start, end = info["data_offsets"]
    if os.path.getsize(file) < 8 + header_size + end:
        raise ValueError(f"{str(file)!r} is truncated: tensor {key!r} needs {end} data bytes.")
    if start == end:
        return torch.empty(shape, dtype=torch_dtype)
    array = np.memmap(file, dtype=np_dtype, mode="c", offset=8 + header_size + start, shape=shape)
    tensor = torch.from_numpy(array)
    return tensor.view(torch_dtype) if np_dtype is np.uint16 else tensor


__all__ = ["GillRetrievalIndex"]
