"""The cache folder: what one build measured that later builds reuse (latency of candidate
layers, TVM tile choices). Entries are keyed by everything that decides them; a missing,
unreadable or corrupt file is an empty cache, and a read-only one only costs measuring again."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from importlib import metadata
from pathlib import Path

from qspec.compiler.errors import UserError

# What `--cache-dir` and `--no-cache` set for one compile (None: not given).
_chosen_folder: Path | None = None
_content_cache = True


def cache_dir() -> Path:
    """Where qspec keeps what later builds reuse: `--cache-dir`, else $QSPEC_CACHE_DIR, else
    $XDG_CACHE_HOME/qspec, else ~/.cache/qspec."""
    if _chosen_folder is not None:
        return _chosen_folder
    folder = os.environ.get("QSPEC_CACHE_DIR")
    if folder:
        return Path(folder)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qspec"


def package_version(package: str) -> str:
    """An installed package's version, read from its metadata (no import): part of the keys
    of everything cached, since another version may compute differently."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


SOURCE_SUFFIXES = (".py", ".lark", ".c")
# The folders that install as qspec's subpackages (and qspec/ itself): qspec's own code.
SOURCE_FOLDERS = ("dsl", "compiler", "passes", "backends", "qspec")
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def is_qspec_source(path: Path) -> bool:
    """Whether a resolved path is one of qspec's own files (never a build's input)."""
    return any(path.is_relative_to(SOURCE_ROOT / folder) for folder in SOURCE_FOLDERS)


@cache
def source_digest(*stages: str) -> str:
    """sha256 of the source files of qspec's `stages` (folders: "passes", "backends"; Python,
    grammar and C): results computed by code that has changed since are stale."""
    root = SOURCE_ROOT
    files = sorted(
        path
        for stage in stages
        for path in (root / stage).rglob("*")
        if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts
    )
    hasher = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        name = path.relative_to(root).as_posix().encode()
        hasher.update(b"%d:%s%d:" % (len(name), name, len(data)) + data)
    return hasher.hexdigest()


def content_cache_enabled() -> bool:
    """Whether builds and per-layer results may be served from the cache (`--no-cache` says
    no; latency and tuning measurements are reused either way)."""
    return _content_cache


@contextmanager
def cache_settings(folder: str | Path | None = None, enabled: bool = True) -> Iterator[None]:
    """`--cache-dir` and `--no-cache` for the duration of one command."""
    global _chosen_folder, _content_cache
    if folder is not None and not str(folder).strip():
        raise UserError("--cache-dir '' names no folder (an unset variable?)")
    before = _chosen_folder, _content_cache
    _chosen_folder = Path(folder) if folder is not None else None
    _content_cache = enabled
    try:
        yield
    finally:
        _chosen_folder, _content_cache = before


def read_entries(path: Path) -> dict[str, object]:
    """A cache file's entries ({} when it is missing, unreadable or not a JSON object)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def add_entries(path: Path, new: Mapping[str, object]) -> None:
    """Merge `new` into the file, re-read just before writing (another process may have added
    entries meanwhile) and replaced in one rename, so readers see the old file or the new one."""
    entries = {**read_entries(path), **new}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp", delete=False
        ) as file:
            json.dump(entries, file, indent=1, sort_keys=True)
        os.replace(file.name, path)
    except OSError:
        pass
