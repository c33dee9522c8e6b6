"""The one save primitive of gill-hf: a folder whose content is named by a manifest.

A save never replaces or empties the folder it writes into. It writes its files into a hidden
staging folder inside the target, then commits by renaming one file, `gill_manifest.json` (each
file's relative name, size and sha256), and only then renames the staged files into place. So:

- before the commit, the old files and the old manifest are untouched: a crash leaves the old version
  (its staging folder is removed by the save itself when it fails, or by a later save once its
  process is gone: never while the process lives, since another of its threads may be writing into it);
- after the commit, the manifest names the new version; a crash during the renames leaves a
  manifest marked `pending`, which the next load (or save) completes from the staging folder;
- files of the old manifest that the new save does not write are removed (they belong to the
  checkpoint being replaced); every other file in the folder (a user's notes, a processor saved
  beside the model, a `retrieval_index/` with its own manifest) is never touched.

Loading goes through `load_consistently`: it completes a pending save, verifies every named file
(size, and sha256 unless told not to), runs the loader, and checks that the manifest did not change
meanwhile (another process saving into the folder); a version that changed under the loader is
loaded again, so a reader sees one version, never a mixture. Folders without a manifest (written
by other tools or older versions) load as before, unverified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

MANIFEST_NAME = "gill_manifest.json"
_FORMAT = "gill-manifest/1"
_STAGING_PREFIX = ".gill-staging-"
_STAGING_PATTERN = re.compile(r"^\.gill-staging-(\d+)-[0-9a-f]{16}$")
_LOAD_ATTEMPTS = 5
# sha256 of files already verified in this process: (path, device, inode, size, mtime) -> digest.
_VERIFIED: dict[tuple, str] = {}

T = TypeVar("T")


class ManifestError(ValueError):
    """A manifest folder that cannot be loaded as it is (a file missing, truncated or altered)."""


# ----- digests ---------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered for this process while its inode, size and mtime stay the same."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    key = (path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


# ----- reading ---------------------------------------------------------------------------------------


def _check_relative(name: Any, manifest: Path) -> str:
    """A manifest entry must name a file inside its folder (a hostile manifest must not reach out)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise ManifestError(f"{str(manifest)!r} names an invalid file {name!r}.")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ManifestError(f"{str(manifest)!r} names a file outside its folder: {name!r}.")
    return name


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest (validated), or None when it has none."""
    path = Path(folder) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ManifestError(f"{str(path)!r} is not valid JSON: {error}") from error
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT or not isinstance(files, dict):
        raise ManifestError(f"{str(path)!r} is not a gill-hf manifest (format {_FORMAT!r} with a 'files' object).")
    for name, entry in files.items():
        _check_relative(name, path)
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or isinstance(entry.get("size"), bool)
                or entry["size"] < 0 or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):
            raise ManifestError(f"{str(path)!r}: entry {name!r} must hold a size >= 0 and a sha256, got {entry!r}.")
    pending = manifest.get("pending")
    if pending is not None:
        if not isinstance(pending, dict) or not _STAGING_PATTERN.match(str(pending.get("staging"))):
            raise ManifestError(f"{str(path)!r} has an invalid 'pending' entry {pending!r}.")
        removed = pending.get("remove", [])
        if not isinstance(removed, list):
            raise ManifestError(f"{str(path)!r}: 'pending.remove' must be a list.")
        for name in removed:
            _check_relative(name, path)
    return manifest


def listed_files(manifest: dict | None) -> dict[str, dict] | None:
    return None if manifest is None else manifest["files"]


def is_part_of_checkpoint(folder: str | os.PathLike, name: str, manifest: dict | None = None) -> bool:
    """Whether `name` belongs to the checkpoint in `folder`: listed in its manifest, or (no manifest)
    present on disk."""
    manifest = read_manifest(folder) if manifest is None else manifest
    if manifest is None:
        return (Path(folder) / name).is_file()
    return name in manifest["files"]


# ----- committing --------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync directories
    finally:
        os.close(fd)


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Atomically replaces `folder/gill_manifest.json`."""
    temporary = folder / f".{MANIFEST_NAME}.{os.getpid()}-{secrets.token_hex(8)}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, folder / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()  # ours: nothing of a failed write stays behind
        raise
    _fsync(folder)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _staged_files(staging: Path) -> dict[str, dict]:
    """Name -> size and sha256 of every file a save staged; each gets the permissions a plain `open`
    gives (0o666 minus the umask): some writers (safetensors) create their files 0o600."""
    entries, umask = {}, _current_umask()
    for path in sorted(staging.rglob("*")):
        relative = path.relative_to(staging).as_posix()
        if relative == MANIFEST_NAME or any(part.startswith(_STAGING_PREFIX) for part in path.relative_to(staging).parts):
            continue  # a nested save's root manifest is superseded by this one
        if path.is_symlink():
            raise ValueError(f"A save wrote a symbolic link ({relative!r}); saves write plain files only.")
        if path.is_file():
            path.chmod(0o666 & ~umask)
            _fsync(path)
            entries[relative] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return entries


def _move_into_place(folder: Path, staging: Path, names: list[str], removed: list[str]) -> None:
    for name in names:
        source = staging / name
        if not source.is_file():
            continue  # already moved (by this process before a crash, or by a concurrent reader)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, folder / name)
        except FileNotFoundError:
            pass  # a concurrent completion moved it first
    for name in removed:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            os.unlink(folder / name)
        parent = (folder / name).parent
        while parent != folder:  # folders the old checkpoint created and that are now empty
            with contextlib.suppress(OSError):
                parent.rmdir()
            parent = parent.parent
    shutil.rmtree(staging, ignore_errors=True)
    _fsync(folder)


def complete_pending(folder: str | os.PathLike, manifest: dict | None = None) -> dict | None:
    """Finishes a save that committed its manifest but was interrupted while renaming files into
    place; returns the (now final) manifest, or None for a folder without one."""
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    if manifest is None or manifest.get("pending") is None:
        return manifest
    pending = manifest["pending"]
    try:
        _move_into_place(folder, folder / pending["staging"], list(manifest["files"]), pending.get("remove", []))
        final = {key: value for key, value in manifest.items() if key != "pending"}
        current = read_manifest(folder)
        if current == manifest:  # nobody committed another version meanwhile
            _write_manifest(folder, final)
        return final
    except PermissionError as error:
        raise ManifestError(
            f"{str(folder)!r} holds an interrupted save that cannot be completed here (read-only): {error}"
        ) from error


def _remove_abandoned_staging(folder: Path) -> None:
    """Staging folders and manifest temporaries of saves that died before committing: their process is
    gone. This process's own are never touched: another thread may be writing into one right now (a
    save or a completing load), and a save that fails here removes its own (`save_folder`,
    `_write_manifest`)."""
    for entry in folder.iterdir():
        match = _STAGING_PATTERN.match(entry.name)
        if match and entry.is_dir() and _abandoned(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in folder.glob(f".{MANIFEST_NAME}.*"):
        pid = entry.name.rsplit(".", 1)[-1].split("-")[0]
        if pid.isdigit() and _abandoned(int(pid)):
            with contextlib.suppress(OSError):
                entry.unlink()


def _abandoned(pid: int) -> bool:
    return pid != os.getpid() and not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def save_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging folder; whatever is written there becomes the new content of
    `target` when the block exits normally (see the module docstring). An exception or a kill
    before the commit leaves `target` as it was."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"`save_directory` {str(target)!r} exists and is not a folder.")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    old = complete_pending(target)  # an earlier interrupted save finishes first
    _remove_abandoned_staging(target)
    staging = target / f"{_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        yield staging
        files = _staged_files(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # only if still empty: nothing of this save remains
        raise
    removed = sorted(set(listed_files(old) or {}) - set(files))
    manifest = {"format": _FORMAT, "files": files, "pending": {"staging": staging.name, "remove": removed}}
    try:
        _write_manifest(target, manifest)  # the commit point
    except BaseException:
        committed = False
        with contextlib.suppress(Exception):
            committed = read_manifest(target) == manifest
        if not committed:  # the old version stands: nothing of this save remains (once committed, a load completes it)
            shutil.rmtree(staging, ignore_errors=True)
        raise
    complete_pending(target, manifest)


def write_manifest_in_place(folder: str | os.PathLike, names: list[str] | None = None) -> dict:
    """Names the files already in `folder` (all, or `names`) in a manifest, e.g. for shipped assets."""
    folder = Path(folder)
    if names is None:
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")]
    manifest = {"format": _FORMAT, "files": {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                                              for name in names}}
    _write_manifest(folder, manifest)
    return manifest


# ----- verified, consistent loading ---------------------------------------------------------------------


def verify_folder(folder: str | os.PathLike, manifest: dict | None = None, *, digests: bool = True,
                  skip_digest: Callable[[str], bool] | None = None) -> dict | None:
    """Completes a pending save, then checks every named file: present, its size, and (unless
    `digests` is False or `skip_digest(name)`) its sha256. A mismatch is a `ManifestError` naming
    the file. Returns the manifest (None: a folder without one, nothing to check)."""
    folder = Path(folder)
    manifest = complete_pending(folder, manifest)
    if manifest is None:
        return None
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{str(path)!r} is missing: {MANIFEST_NAME} names it as part of this checkpoint.")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ManifestError(f"{str(path)!r} has {size} bytes, {MANIFEST_NAME} says {entry['size']} (truncated or replaced).")
        if digests and not (skip_digest and skip_digest(name)) and file_sha256(path) != entry["sha256"]:
            raise ManifestError(f"{str(path)!r} does not match its sha256 in {MANIFEST_NAME} (corrupted or altered).")
    return manifest


def load_consistently(folder: str | os.PathLike, load: Callable[[dict | None], T], *, digests: bool = True,
                      skip_digest: Callable[[str], bool] | None = None) -> T:
    """Runs `load(manifest)` on a verified folder and returns its result, retrying when another
    process committed a new version while it ran (so the result never mixes two versions). An
    error that is not explained by such a concurrent save is raised as it is."""
    for _ in range(_LOAD_ATTEMPTS):
        before = read_manifest(folder)
        try:
            manifest = verify_folder(folder, before, digests=digests, skip_digest=skip_digest)
            result = load(manifest)
        except Exception:
            if listed_files(read_manifest(folder)) != listed_files(before):
                continue  # the folder changed under us: load the new version
            raise
        if listed_files(read_manifest(folder)) == listed_files(manifest):
            return result
    raise ManifestError(f"{os.fspath(folder)!r} changed {_LOAD_ATTEMPTS} times while loading (another process keeps saving into it).")


__all__ = [
    "MANIFEST_NAME",
    "ManifestError",
    "complete_pending",
    "file_sha256",
    "is_part_of_checkpoint",
    "load_consistently",
    "read_manifest",
    "save_folder",
    "verify_folder",
    "write_manifest_in_place",
]
