"""What a build read: the files a depfile lists, the build cache keys on and `--check` re-hashes.

The spec names some inputs itself (its includes, calibration arrays, a Hugging Face folder, an
exported program). The rest are found while the spec's Python entries run:
- the user's Python modules they import (new entries of `sys.modules` outside the standard
  library, site-packages and qspec itself);
- data files opened for reading from Python (`open`, `numpy.load`, `torch.load`: the interpreter's
  audit hook sees each), outside the standard library and system folders (site-packages counts:
  packages ship weights);
- safetensors files, which Rust opens where no audit hook sees it: `safetensors.safe_open` is
  wrapped while the entries run;
- the weights, configuration and tokenizer files of a Hugging Face folder whose `config.json`
  (naming a `model_type`) was read: its tokenizer files are read by Rust as well.
Files read by other native code are not seen: a build rule lists them itself (DEPENDS).
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qspec.compiler.cache import is_qspec_source

ENTRY_PREFIX = "qspec_user_"  # how compiler.source names the modules of entry files
CODE_SUFFIXES = {".py", ".pyc", ".pyi", ".pyd", ".so", ".pth"}
SYSTEM_ROOTS = tuple(map(Path, ("/proc", "/sys", "/dev", "/etc", "/lib", "/lib64", "/usr/lib")))
HF_FILES = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf"}

# What the hooks below note, innermost recording last: each file with its state when first read.
_recording: list[dict[Path, FileState]] = []
# Modules that entries imported while a recording ran: a later build in the same process (the
# Python API) finds them already imported, and still depends on them. (Two projects compiled in
# one process thus list each other's helper modules: more rebuilds, never fewer.) The entry
# files themselves are named by the spec.
_imported_by_entries: set[str] = set()
_hooked = False


def _library_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return tuple(Path(root).resolve() for root in roots)


FileState = tuple[int, int] | None  # (mtime in ns, size); None: not there


def file_state(path: Path) -> FileState:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _note(path: Path) -> None:
    if path not in _recording[-1]:
        _recording[-1][path] = file_state(path)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """The interpreter's audit hook (installed once, for good): note files opened to be read."""
    if event != "open" or not _recording:
        return
    path, mode, flags = args
    if isinstance(path, int) or path is None:
        return
    writing = (mode is not None and any(c in mode for c in "wax+")) or (
        mode is None and flags & (os.O_WRONLY | os.O_RDWR)
    )
    if not writing:
        _note(Path(os.fsdecode(path)))


def _track_safetensors() -> Callable[[], None]:
    """Point every `safe_open` name at a wrapper that notes its file; returns the undo."""
    try:
        import safetensors
        import safetensors.numpy
        import safetensors.torch  # bound now, so that its `safe_open` is replaced too
    except ImportError:
        return lambda: None
    real = safetensors.safe_open

    def noting_safe_open(filename: Any, *args: Any, **kwargs: Any) -> Any:
        if _recording:
            _note(Path(os.fsdecode(filename)))
        return real(filename, *args, **kwargs)

    def point_at(old: Any, new: Any) -> None:
        for module in list(sys.modules.values()):
            if getattr(module, "safe_open", None) is old:
                module.safe_open = new  # type: ignore[attr-defined]

    point_at(real, noting_safe_open)
    return lambda: point_at(noting_safe_open, real)


class Recording:
    """The files read since it began: data files opened, and user modules imported."""

    def __init__(self) -> None:
        self.opened: dict[Path, FileState] = {}
        self.modules_before = set(sys.modules)
        self.started_ns = time.time_ns()

    def changed(self, inputs: Iterable[Path]) -> list[Path]:
        """The inputs that changed since the build read them (or, for those it did not see
        being read, since it began): a build of such inputs belongs to no version of them."""
        states = {p.resolve(): state for p, state in self.opened.items() if not _is_code(p)}
        found = []
        for path in inputs:
            now = file_state(path)
            if path in states:
                if now != states[path]:
                    found.append(path)
            elif now is None or now[0] > self.started_ns:
                found.append(path)
        return found

    def modules(self) -> set[Path]:
        new = set(sys.modules) - self.modules_before
        return _user_modules(new | (_imported_by_entries & set(sys.modules)))


@contextmanager
def recording() -> Iterator[Recording]:
    """Collect the files read while the block runs (see the module docstring)."""
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    undo = _track_safetensors()
    record = Recording()
    _recording.append(record.opened)
    try:
        yield record
    finally:
        _recording.remove(record.opened)
        _imported_by_entries.update(
            name
            for name in set(sys.modules) - record.modules_before
            if not name.startswith(ENTRY_PREFIX)
        )
        undo()


def _user_modules(names: Iterable[str]) -> set[Path]:
    """The source files of modules outside the standard library, site-packages and qspec."""
    libraries = _library_roots()
    found = set()
    for name in names:
        file = getattr(sys.modules.get(name), "__file__", None)
        if not file or name == "qspec" or name.startswith("qspec."):
            continue
        path = Path(file).resolve()
        if path.suffix == ".py" and not any(path.is_relative_to(root) for root in libraries):
            found.add(path)
    return found


def build_inputs(read: Iterable[Path], named: Iterable[Path]) -> list[Path]:
    """The input files of a build, resolved and sorted: the `named` ones (the spec's files,
    user modules) plus the data files its entries `read`, without code, system files and
    package metadata."""
    files: set[Path] = set()
    for path in read:
        if _is_code(path):  # before resolving: imports open thousands of them
            continue
        resolved = path.resolve()
        if not resolved.is_file() or resolved.is_relative_to(Path(sys.base_prefix).resolve()):
            continue
        if any(resolved.is_relative_to(root) for root in SYSTEM_ROOTS) or any(
            part.endswith((".dist-info", ".egg-info")) for part in resolved.parts
        ):
            continue  # kernel files and package metadata (read by importlib.metadata)
        if resolved.suffix in CODE_SUFFIXES or is_qspec_source(resolved):
            continue  # code counts as a user module only (tracebacks read library sources)
        files.add(resolved)
        if resolved.name == "config.json" and _is_model_folder(resolved.parent):
            files |= _folder_files(resolved.parent)
    for path in named:
        resolved = path.resolve()
        files |= _folder_files(resolved) if resolved.is_dir() else {resolved}
    return sorted(files)


def _is_code(path: Path) -> bool:
    return path.suffix in CODE_SUFFIXES


def _is_model_folder(folder: Path) -> bool:
    """A Hugging Face model folder: its config.json names a `model_type`."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def _folder_files(folder: Path) -> set[Path]:
    """The files of a Hugging Face model folder that loading it may read (weights, configs,
    tokenizer files), not whatever else lives there."""
    return {
        path.resolve()
        for path in folder.iterdir()
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name in HF_FILES)
    }


def relative_to(path: Path, base: Path) -> str:
    """`path` as written relative to `base` (the spec's folder), for manifests and cache
    entries that must not name the build machine's folders."""
    return Path(os.path.relpath(path, base)).as_posix()


def escape_make(path: str) -> str:
    """A path as a Make/Ninja depfile spells it (GCC's escaping)."""
    if "\n" in path:
        raise ValueError(f"a depfile cannot name a path with a newline: {path!r}")
    return path.replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")


def depfile_text(target: str, prerequisites: Iterable[Path]) -> str:
    """`target: prerequisites...` with one empty rule per prerequisite (as `gcc -MP`), so that
    Make does not stop when an input is deleted."""
    names = [escape_make(str(path)) for path in prerequisites]
    lines = [f"{escape_make(target)}:" + "".join(f" \\\n  {name}" for name in names), ""]
    lines += [f"{name}:\n" for name in names]
    return "\n".join(lines)
