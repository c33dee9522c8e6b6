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
        revision = reference.get("revision")
        return reference["repo_id"], ({"revision": revision} if revision else {})
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
