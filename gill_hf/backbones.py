"""Resolving backbone references for the adapter checkpoint form.

A reference names exactly one backbone and never silently resolves to a different one:
- a string: a hub id or a local folder, as `from_pretrained` takes it;
- `{"repo_id": ..., "revision": ...}`: a hub repository at a revision;
- `{"path": ...}`: a local folder;
- `{"embedded": name, "sha256": digest}`: an artifact shipped inside an installed package,
  materialised by the loader registered under `name` (see `register_embedded_backbone`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .modeling.checkpointing import looks_like_a_local_path

EmbeddedLoader = Callable[[str], str]
_EMBEDDED: dict[str, EmbeddedLoader] = {}


def register_embedded_backbone(name: str, loader: EmbeddedLoader) -> None:
    """Registers `loader(sha256) -> folder` for the embedded artifact `name`; the loader checks
    the digest and returns a folder that `from_pretrained` loads."""
    _EMBEDDED[name] = loader


def resolve_backbone(reference: Any) -> tuple[str, dict]:
    """Turns a backbone reference into `(path_or_repo_id, extra from_pretrained kwargs)`."""
    if isinstance(reference, (str, os.PathLike)):
        return os.fspath(reference), {}
    if not isinstance(reference, dict):
        raise TypeError(f"A backbone reference must be a str or a dict, got {type(reference).__name__}.")
    kinds = [key for key in ("repo_id", "path", "embedded") if key in reference]
    if len(kinds) != 1:
        raise ValueError(f"A backbone reference names exactly one of repo_id / path / embedded, got {reference!r}.")
    if "repo_id" in reference:
        repo_id, revision = reference["repo_id"], reference.get("revision")
        if not isinstance(repo_id, str) or not repo_id or looks_like_a_local_path(repo_id):
            raise ValueError(f"{repo_id!r} is not a hub repo id (`name` or `org/name`); name a local folder with {{'path': ...}}.")
        if os.path.exists(repo_id):
            # from_pretrained would silently load that folder instead of the hub repository.
            raise ValueError(
                f"The backbone reference {{'repo_id': {repo_id!r}}} names a hub repository, but a local path "
                f"{os.path.abspath(repo_id)!r} of the same name exists and would be loaded instead; run from another "
                "folder or reference the local copy with {'path': ...}."
            )
        return repo_id, ({"revision": revision} if revision else {})
    if "path" in reference:
        if not os.path.isdir(reference["path"]):
            raise ValueError(f"The backbone folder {reference['path']!r} does not exist.")
        return reference["path"], {}
    name = reference["embedded"]
    if "sha256" not in reference:
        raise ValueError(f"The embedded backbone reference {name!r} must carry its sha256.")
    if name not in _EMBEDDED:
        raise ValueError(f"Unknown embedded backbone {name!r}; known: {sorted(_EMBEDDED)}.")
    return _EMBEDDED[name](reference["sha256"]), {}


__all__ = ["register_embedded_backbone", "resolve_backbone"]
