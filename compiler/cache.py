"""The cache folder: what one build measured that later builds reuse (latency of candidate
layers, TVM tile choices). Entries are keyed by everything that decides them; a missing,
unreadable or corrupt file is an empty cache, and a read-only one only costs measuring again."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


def cache_dir() -> Path:
    """Where qspec keeps what later builds reuse: $QSPEC_CACHE_DIR, else ~/.cache/qspec."""
    folder = os.environ.get("QSPEC_CACHE_DIR")
    return Path(folder) if folder else Path.home() / ".cache" / "qspec"


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
