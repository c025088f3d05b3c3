"""The build cache: whole build folders, addressed by content, restored without importing torch.

A build is decided by its *action* (the spec's canonical IR, qspec and tool versions, the host
features code generation sees) and its *inputs* (the content of every file the build read).
The inputs are only known after a build has run the spec's entries, so an entry is found in two
steps, as ccache's direct mode does: `builds/<action key>/` holds one entry per input set seen,
each naming its inputs (relative to the spec's folder) with their hashes; the entry whose
inputs all still hash the same is the hit. Every restored file is checked against the hash the
entry recorded: a corrupt or tampered entry is removed and the build runs.

Nothing in an entry is executed or unpickled: it is a JSON file and the build folder's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

from qspec.compiler.cache import SOURCE_FOLDERS, cache_dir, package_version, source_digest
from qspec.compiler.folder import FORMAT_VERSION, MANIFEST, sha256_file
from qspec.compiler.host import cpu_flags
from qspec.dsl import ir

ENTRY_VERSION = 1
TOOLS = (
    "qspec",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "apache-tvm",
    "numpy",
    "lark",
    "transformers",
)
DEFAULT_LIMIT = 5 << 30  # bytes; QSPEC_CACHE_SIZE overrides ("2G", "500M", "1048576")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def tool_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (no import)."""
    return {"python": platform.python_version(), **{tool: package_version(tool) for tool in TOOLS}}


def host_features() -> dict[str, str]:
    """What makes generated code differ between machines: the architecture and CPU flags
    (TVM's llvm target compiles for the host's vector extensions)."""
    flags = " ".join(sorted(cpu_flags()))
    return {"machine": platform.machine(), "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()}


def action_key(spec: ir.Spec) -> str:
    """The part of a build's key known before any user code runs. Spans and comments are not
    part of the IR's repr, so reformatting a spec keeps its key."""
    canonical = repr(dataclasses.replace(spec, path="", files=()))
    payload = {
        "entry": ENTRY_VERSION,
        "format": FORMAT_VERSION,
        "spec_name": Path(spec.path).name,
        "spec": canonical,
        "tools": tool_versions(),
        # a development install's code changes without a new version number
        "qspec_source": source_digest(*SOURCE_FOLDERS),
        "host": host_features(),
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def inputs_key(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def changed_inputs(recorded: dict[str, str], base: Path) -> list[str]:
    """The recorded inputs (relative to `base`) whose content changed, or that are gone."""
    changed = []
    for path, digest in recorded.items():
        try:
            same = sha256_file(base / path) == digest
        except OSError:
            same = False
        if not same:
            changed.append(path)
    return changed


@dataclass
class Entry:
    """A cache entry that matched: its folder and the files to restore (with their hashes)."""

    folder: Path
    inputs: dict[str, str]
    files: dict[str, str]
    latency_ms: dict[str, float]  # measured by the build that filled the entry


def _builds() -> Path:
    return cache_dir() / "builds"


def lookup(action: str, base: Path) -> Entry | None:
    """The entry of `action` whose inputs (relative to `base`) all hash as recorded."""
    folder = _builds() / action
    try:
        candidates = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for candidate in candidates:
        entry = _read_entry(candidate)
        if entry is None:
            continue
        if changed_inputs(entry.inputs, base):
            continue
        if _files_intact(entry):
            _touch(candidate)
            return entry
        shutil.rmtree(candidate, ignore_errors=True)  # corrupt or tampered: build again
    return None


def _read_entry(folder: Path) -> Entry | None:
    """An entry's record, or None where it is not one qspec wrote whole."""
    try:
        record = json.loads((folder / "entry.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != ENTRY_VERSION:
        return None
    inputs, files = record.get("inputs"), record.get("files")
    if not (_hash_table(inputs) and _hash_table(files)) or folder.name != inputs_key(inputs):
        return None
    if not all(_inside(name) for name in files) or MANIFEST not in files:
        return None
    latency = record.get("latency_ms")
    if not isinstance(latency, dict) or not all(
        isinstance(value, int | float) for value in latency.values()
    ):
        latency = {}
    return Entry(folder, inputs, files, {str(name): float(ms) for name, ms in latency.items()})


def _hash_table(table: object) -> TypeGuard[dict[str, str]]:
    return isinstance(table, dict) and all(
        isinstance(key, str) and isinstance(value, str) and _HEX64.fullmatch(value)
        for key, value in table.items()
    )


def _inside(name: str) -> bool:
    """A relative path that stays inside the folder it is joined to."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def _files_intact(entry: Entry) -> bool:
    """Every file hashes as the entry says, and the entry's manifest lists the same files."""
    root = entry.folder / "files"
    for name, digest in entry.files.items():
        path = root / name
        if path.is_symlink() or not path.is_file() or sha256_file(path) != digest:
            return False
    try:
        listed = json.loads((root / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    return listed == {name: digest for name, digest in entry.files.items() if name != MANIFEST}


def restore(entry: Entry, stage: Path) -> None:
    for name in entry.files:
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry.folder / "files" / name, target)


def store(action: str, build: Path, manifest: dict[str, Any], latency_ms: dict[str, float]) -> None:
    """Copy a finished build folder into the cache, its files' hashes taken from its manifest
    (every restore checks them again); a cache that cannot be written only costs the next build
    its hit."""
    inputs: dict[str, str] = manifest["inputs"]
    files = {**manifest["files"], MANIFEST: sha256_file(build / MANIFEST)}
    record = {"version": ENTRY_VERSION, "inputs": inputs, "files": files, "latency_ms": latency_ms}
    final = _builds() / action / inputs_key(inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=".incoming-", dir=final.parent))
    except OSError:
        return
    try:
        for name in files:
            (temporary / "files" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(build / name, temporary / "files" / name)
        (temporary / "entry.json").write_text(json.dumps(record, indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        return
    evict(limit())


def _touch(folder: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still serves hits
        os.utime(folder)


def limit() -> int:
    """The cache's size limit in bytes: $QSPEC_CACHE_SIZE, else 5 GiB."""
    text = os.environ.get("QSPEC_CACHE_SIZE", "").strip().upper().removesuffix("B")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)I?", text)
    if not match:
        return DEFAULT_LIMIT
    return int(float(match[1]) * _UNITS[match[2]])


def entries() -> list[tuple[Path, int, float]]:
    """Every build entry with its size and when it was last used."""
    found = []
    for action in _builds().glob("*"):
        if not _HEX64.fullmatch(action.name):
            continue
        for entry in action.glob("[0-9a-f]*"):
            if not (_HEX64.fullmatch(entry.name) and entry.is_dir()):
                continue
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            found.append((entry, size, entry.stat().st_mtime))
    return found


def layer_entries() -> list[tuple[Path, int, float]]:
    """Every per-layer result (`compiler.layercache`: a `.safetensors` file and its `.json`
    record, touched on each use) with its size and when it was last used."""
    found = []
    for record in (cache_dir() / "layers").glob("*/*/*.json"):
        payload = record.with_suffix(".safetensors")
        if not (_HEX64.fullmatch(record.stem) and payload.is_file()):
            continue
        with contextlib.suppress(OSError):
            size = record.stat().st_size + payload.stat().st_size
            found.append((payload, size, record.stat().st_mtime))
    return found


def evict(budget: int) -> list[Path]:
    """Remove the least recently used builds and per-layer results until the cache fits in
    `budget` bytes."""
    removed = []
    listed = sorted([*entries(), *layer_entries()], key=lambda entry: entry[2])
    total = sum(size for _, size, _ in listed)
    for path, size, _ in listed:
        if total <= budget:
            break
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the spec's folder of entries, once empty
        else:
            path.with_suffix(".json").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


# What `qspec cache clear` removes: only what qspec writes into the cache folder.
OWN_NAMES = ("builds", "layers", "latency.json", "tvm-tuning.json", "cuda-driver-stub")


def info() -> dict[str, Any]:
    folder = cache_dir()
    parts = {}
    for name in OWN_NAMES:
        path = folder / name
        if path.is_file():
            parts[name] = path.stat().st_size
        elif path.is_dir():
            parts[name] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    listed = entries()
    oldest = min((used for _, _, used in listed), default=None)
    return {
        "folder": str(folder),
        "builds": len(listed),
        "layer_results": len(layer_entries()),
        "bytes": parts,
        "total_bytes": sum(parts.values()),
        "limit_bytes": limit(),
        "least_recently_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(oldest))
        if oldest
        else None,
    }


def clear() -> int:
    """Remove what qspec wrote in the cache folder, recognised by how qspec names it, and
    nothing else (the folder may be shared); returns the bytes freed."""
    folder = cache_dir()
    ours = [path for path, _, _ in entries()]
    ours += list((folder / "builds").glob("*/.incoming-*"))
    for payload, _, _ in layer_entries():
        ours += [payload, payload.with_suffix(".json")]
    ours += [folder / "cuda-driver-stub" / "libcuda.so.1"]
    ours += [path for path in map(folder.joinpath, MEASUREMENTS) if _json_object(path)]
    freed = 0
    for path in ours:
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                shutil.rmtree(path)
            elif path.is_file():
                freed += path.stat().st_size
                path.unlink()
    for parent in sorted({p.parent for p in ours}, key=lambda p: len(p.parts), reverse=True):
        for empty in (parent, parent.parent, parent.parent.parent):
            if empty.is_relative_to(folder) and empty != folder:
                with contextlib.suppress(OSError):
                    empty.rmdir()  # only when empty
    return freed


MEASUREMENTS = ("latency.json", "tvm-tuning.json")


def _json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False
