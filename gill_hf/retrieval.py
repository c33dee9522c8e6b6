"""GillRetrievalIndex: normalised image embeddings (memory-mapped safetensors) plus references to
the images (paths, URLs or rows of a `datasets.Dataset`), searched exactly by cosine similarity.

It is a diffusers `ModelMixin`, so `GillPipeline.save_pretrained`/`from_pretrained` carry it as a
component; its own `save_pretrained`/`from_pretrained` keep the embeddings memory-mapped instead
of loading them as parameters. Images are decoded only when `get_image` asks for one.
"""

from __future__ import annotations

import io
import json
import logging
import math
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

from .images import check_image_size
from .modeling.checkpointing import looks_like_a_local_path
from .modeling.manifest import load_consistently, save_folder

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
_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

logger = logging.getLogger(__name__)


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
        # An open handle on the loaded version's references.jsonl, parsed on first use (loading stays
        # fast for millions of entries); holding it keeps that version even if the folder is re-saved.
        self._references_handle = None
        self._embeddings_handle = None  # the loaded embeddings file (its first full scan verifies it)
        self._embeddings_check: tuple[str, str | None] | None = None  # (file name, expected sha256) until checked
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
        if embeddings.dtype not in _STORAGE_DTYPES:
            raise TypeError(f"`embeddings` has dtype {embeddings.dtype}; expected one of {_STORAGE_DTYPES}.")
        _check_finite_rows(embeddings, "`embeddings`")
        if (references is None) == (dataset is None):
            raise ValueError("Pass exactly one of `references` (paths or URLs) and `dataset`.")
        count = len(references) if references is not None else len(dataset)
        if count != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {count} images.")
        index = cls(embedding_dim=embeddings.shape[1], image_column=image_column)
        index.embeddings = F.normalize(embeddings.detach().float(), dim=-1).to(embeddings.dtype).cpu().contiguous()
        if references is not None and not all(isinstance(r, str) and r for r in references):
            raise TypeError("`references` must be non-empty strings (paths or URLs), one per embedding.")
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
        if dtype not in _STORAGE_DTYPES:
            raise TypeError(f"`dtype` must be one of {_STORAGE_DTYPES}, got {dtype!r}.")
        image_processor = getattr(processor, "image_processor", processor)
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if not folder.is_dir():
                raise ValueError(f"`source` {str(source)!r} is not a folder.")
            entries = [str(p.resolve()) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not entries:
                raise ValueError(f"`source` {str(source)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
            read = lambda i: _open_image(entries[i])  # noqa: E731
        elif hasattr(source, "column_names"):
            if image_column not in source.column_names:
                raise ValueError(f"The dataset has no column {image_column!r} (columns: {source.column_names}).")
            if len(source) == 0:
                raise ValueError("`source` is an empty dataset.")
            entries = range(len(source))
            read = lambda i: _checked_rgb(source[i][image_column], f"row {i}")  # noqa: E731
        else:
            raise TypeError(f"`source` is a {type(source).__name__}; expected a datasets.Dataset or a folder path.")
        device = next(model.parameters()).device
        chunks, kept, unreadable = [], [], []
        for start in range(0, len(entries), batch_size):
            images = []
            for i in range(start, min(start + batch_size, len(entries))):
                try:  # one unreadable image costs that image, not the build
                    images.append(read(i))
                    kept.append(i)
                except Exception as error:
                    unreadable.append(f"{entries[i]}: {error}")
            if images:
                pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
                chunks.append(model.get_image_retrieval_embeds(pixel_values=pixels.to(device)).float().cpu())
        if unreadable:
            logger.warning("GillRetrievalIndex.build skipped %d unreadable image(s): %s", len(unreadable), "; ".join(unreadable[:5]))
        if not kept:
            raise ValueError(f"`source` holds no readable image ({len(unreadable)} unreadable).")
        embeddings = torch.cat(chunks).to(dtype)
        if isinstance(source, (str, os.PathLike)):
            return cls.from_embeddings(embeddings, references=[entries[i] for i in kept], image_column=image_column)
        dataset = source if len(kept) == len(source) else source.select(kept)
        return cls.from_embeddings(embeddings, dataset=dataset, image_column=image_column)

    @property
    def references(self) -> list[str] | None:
        """Image paths or URLs, one per entry (None for a dataset-backed index)."""
        if self._references is None and self._references_handle is not None:
            self._references = _parse_references(self._references_handle, len(self))
        return self._references

    @references.setter
    def references(self, value: list[str] | None) -> None:
        self._references, self._references_handle = value, None

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
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"`query` must be a torch.Tensor, got {type(query).__name__}.")
        k = min(k, max(len(self), 1))  # never more columns than entries
        single = query.ndim == 1
        query = query[None] if single else query
        if query.ndim != 2 or query.shape[1] != self.config.embedding_dim:
            raise ValueError(f"`query` must be (n, {self.config.embedding_dim}) or ({self.config.embedding_dim},), got {tuple(query.shape)}.")
        if not torch.isfinite(query).all():
            raise ValueError("`query` holds NaN or infinite values.")
        self._check_embeddings_once()
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

    def to(self, *args, **kwargs):
        """As `nn.Module.to`; a floating dtype also converts the stored embeddings (the pipeline's
        `.to(dtype)` reaches the index like every other component)."""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is not None and dtype.is_floating_point and dtype != self.embeddings.dtype:
            self._check_embeddings_once()  # check the stored version before it is converted
            self.embeddings = self.embeddings.to(dtype)
            self._device_embeddings = None
        return super().to(*args, **kwargs)

    def _check_embeddings_once(self) -> None:
        """The first full scan of loaded embeddings checks them: the file against its sha256 (read
        through the handle of the loaded version) and every row finite. Cheaper than it sounds: the
        scan reads every row anyway."""
        if self._embeddings_check is None:
            return
        name, expected = self._embeddings_check
        if expected is not None and self._embeddings_handle is not None:
            actual = _handle_sha256(self._embeddings_handle)
            if actual != expected:
                raise ValueError(f"{name!r} does not match its sha256 in gill_manifest.json (corrupted or altered).")
        _check_finite_rows(self.embeddings, repr(name))
        self._embeddings_check = None

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

    def local_references(self) -> list[str]:
        """References that name local files (not URLs); empty for a dataset-backed index."""
        if self.dataset is not None:
            return []
        return [r for r in self.references if not r.startswith(("http://", "https://"))]

    def with_embedded_images(self) -> GillRetrievalIndex:
        """The same index backed by a `datasets.Dataset` holding its local images' bytes, so that a
        saved (or pushed) copy carries them; URLs stay references to be fetched on retrieval."""
        import datasets

        if self.dataset is not None:
            return self
        missing = [r for r in self.local_references() if not os.path.isfile(r)]
        if missing:
            raise ValueError(f"{len(missing)} indexed image files do not exist (e.g. {missing[0]!r}); cannot embed them.")
        rows = [{"bytes": None, "path": r} if r.startswith(("http://", "https://")) else {"bytes": Path(r).read_bytes(), "path": os.path.basename(r)}
                for r in self.references]
        if any(row["bytes"] is None for row in rows):
            raise ValueError("An index mixing URLs and local files cannot be embedded; embed a local-only index.")
        dataset = datasets.Dataset.from_dict({self.config.image_column: rows},
                                             features=datasets.Features({self.config.image_column: datasets.Image()}))
        return GillRetrievalIndex.from_embeddings(self.embeddings, dataset=dataset, image_column=self.config.image_column)

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

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, variant: str | None = None,
                        **kwargs) -> None:
        """Writes `config.json`, `embeddings.safetensors` (`embeddings.<variant>.safetensors`) and
        `references.jsonl` (or the dataset as an arrow table under `dataset/`) through the manifest
        primitive: a crash leaves the old index or the new one, and files of the folder that are not
        the index's are never touched. Embeddings are always safetensors."""
        with save_folder(save_directory) as staging:
            self.save_config(staging)
            save_file({"embeddings": self.embeddings.contiguous()}, str(staging / _embeddings_name(variant)), metadata={"format": "pt"})
            if self.dataset is not None:
                self.dataset.save_to_disk(str(staging / DATASET_DIR))
            with open(staging / REFERENCES_NAME, "w", encoding="utf-8") as f:
                for i in range(len(self)):
                    entry = {"row": i} if self.dataset is not None else {"path": self.references[i]}
                    f.write(json.dumps(entry) + "\n")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, verify: bool = False, **kwargs
    ) -> GillRetrievalIndex:
        """Loads an index saved by `save_pretrained`; the embeddings stay memory-mapped (read-only
        pages are shared with the file, nothing is copied until searched on an accelerator).

        Every file is checked against `gill_manifest.json` (sizes; sha256 of the small files); the
        embeddings' sha256 and finiteness are checked on the first search (which reads every row
        anyway), or here with `verify=True`. The index holds the files of one saved version open,
        so a concurrent re-save of the folder never mixes its references with these embeddings."""
        if not os.path.isdir(pretrained_model_name_or_path):
            if looks_like_a_local_path(pretrained_model_name_or_path):
                raise ValueError(f"The retrieval index folder {os.fspath(pretrained_model_name_or_path)!r} does not exist.")
            from huggingface_hub import snapshot_download

            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token") if k in kwargs}
            pretrained_model_name_or_path = snapshot_download(str(pretrained_model_name_or_path), **hub_kwargs)
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        embeddings_name = _embeddings_name(kwargs.get("variant"))
        if not (folder / embeddings_name).is_file() and (folder / EMBEDDINGS_NAME).is_file():
            embeddings_name = EMBEDDINGS_NAME  # no such variant: the plain file, as diffusers falls back
        lazily_verified = lambda name: name == embeddings_name or name.startswith(f"{DATASET_DIR}/")  # noqa: E731
        index = load_consistently(folder, lambda manifest: cls._load_version(folder, manifest, embeddings_name),
                                  skip_digest=None if verify else lazily_verified)
        if verify:
            index._check_embeddings_once()
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype is not None:
            index.embeddings = index.embeddings.to(dtype)
        return index

    @classmethod
    def _load_version(cls, folder: Path, manifest: dict | None, embeddings_name: str = EMBEDDINGS_NAME) -> GillRetrievalIndex:
        for name in (cls.config_name, embeddings_name, REFERENCES_NAME):
            if not (folder / name).is_file():
                raise ValueError(f"The retrieval index at {str(folder)!r} lacks {name!r}.")
        index = cls.from_config(cls.load_config(folder))
        embeddings_handle = open(folder / embeddings_name, "rb")
        index.embeddings = _mmap_tensor(embeddings_handle, str(folder / embeddings_name), "embeddings")
        index._embeddings_handle = embeddings_handle
        expected = manifest["files"][embeddings_name]["sha256"] if manifest and embeddings_name in manifest["files"] else None
        index._embeddings_check = (str(folder / embeddings_name), expected)
        if index.embeddings.ndim != 2 or index.embeddings.shape[1] != index.config.embedding_dim:
            raise ValueError(f"{str(folder / embeddings_name)!r} holds a tensor of shape {tuple(index.embeddings.shape)}, expected (n, {index.config.embedding_dim}).")
        handle = open(folder / REFERENCES_NAME, "rb")
        raw = handle.read()
        count = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
        if count != len(index):
            raise ValueError(f"{str(folder / REFERENCES_NAME)!r} has {count} lines for {len(index)} embeddings (truncated?).")
        if (folder / DATASET_DIR).is_dir():
            import datasets

            index.dataset, index.references = datasets.load_from_disk(str(folder / DATASET_DIR)), None
            handle.close()
        else:
            index._references, index._references_handle = None, handle
        return index


def _embeddings_name(variant: str | None) -> str:
    return EMBEDDINGS_NAME if not variant else EMBEDDINGS_NAME.replace(".safetensors", f".{variant}.safetensors")


def _parse_references(handle, count: int) -> list[str]:
    """`references.jsonl`: one JSON object per line, `{"path": ...}`; a blank or malformed line is an
    error naming it (it would shift every later entry)."""
    handle.seek(0)
    name = getattr(handle, "name", REFERENCES_NAME)
    references = []
    for number, line in enumerate(handle.read().decode("utf-8").split("\n")[:count], start=1):
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{name!r} line {number} is not a JSON object ({error}).") from error
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ValueError(f"{name!r} line {number} must be an object with a non-empty \"path\", got {line[:80]!r}.")
        references.append(entry["path"])
    return references


def _handle_sha256(handle) -> str:
    import hashlib

    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(handle.fileno(), 1 << 22, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _check_finite_rows(embeddings: torch.Tensor, name: str) -> None:
    """Every row finite (a NaN row would rank first for every query, an inf row above 1)."""
    for start in range(0, embeddings.shape[0], 1 << 16):
        block = embeddings[start : start + (1 << 16)]
        bad = (~torch.isfinite(block)).any(-1).nonzero()
        if bad.numel():
            raise ValueError(f"{name} row {start + int(bad[0])} holds NaN or infinite values.")


def _open_image(path: str) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        check_image_size(image.width, image.height, path)  # before decoding anything
        image.load()  # decode now: a truncated file fails here
        return image.convert("RGB")


def _checked_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    check_image_size(image.width, image.height, name)
    return image.convert("RGB")


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


def _mmap_tensor(handle, file: str, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped from an open handle (copy-on-write, so torch
    gets a writable array without ever writing to the file). The header is checked against the
    file before anything is mapped: a lying header is a `ValueError` naming the file."""
    size = os.fstat(handle.fileno()).st_size
    raw = os.pread(handle.fileno(), 8, 0)
    if len(raw) < 8:
        raise ValueError(f"{file!r} is not a safetensors file (truncated header).")
    header_size = struct.unpack("<Q", raw)[0]
    if header_size > min(size - 8, 100 << 20):
        raise ValueError(f"{file!r} declares a {header_size}-byte header in a {size}-byte file.")
    try:
        header = json.loads(os.pread(handle.fileno(), header_size, 8))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{file!r} has a corrupt safetensors header: {error}") from error
    info = header.get(key) if isinstance(header, dict) else None
    if not isinstance(info, dict):
        raise ValueError(f"{file!r} has no tensor {key!r}.")
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{file!r}: tensor {key!r} has dtype {info.get('dtype')}; expected F32, F16 or BF16.")
    np_dtype, torch_dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    valid_ints = lambda values, n: isinstance(values, list) and len(values) == n and all(  # noqa: E731
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    if not valid_ints(shape, 2) or not valid_ints(offsets, 2):
        raise ValueError(f"{file!r}: tensor {key!r} must have a 2-d shape and two data offsets, got {shape} / {offsets}.")
    start, end = offsets
    if end - start != math.prod(shape) * np.dtype(np_dtype).itemsize:
        raise ValueError(f"{file!r}: tensor {key!r} of shape {shape} does not fill its {end - start} data bytes.")
    if 8 + header_size + end > size:
        raise ValueError(f"{file!r} is truncated: tensor {key!r} needs {end} data bytes.")
    if start == end:
        return torch.empty(shape, dtype=torch_dtype)
    array = np.memmap(handle, dtype=np_dtype, mode="c", offset=8 + header_size + start, shape=tuple(shape))
    tensor = torch.from_numpy(array)
    return tensor.view(torch_dtype) if np_dtype is np.uint16 else tensor


__all__ = ["GillRetrievalIndex"]
