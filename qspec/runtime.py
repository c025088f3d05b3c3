"""Load a build folder and run it with the backend's own runtime: `qspec.load(folder)`.

A build folder is checked before anything in it is opened: its manifest must be one this qspec
reads, every file a target loads must lie inside the folder (no `..`, absolute path or symlink
leading out) and hash as the manifest says. The hashes catch a damaged or edited folder, not a
forged one: a TVM `model.so` is native code, so run TVM builds only from sources you trust.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from qspec.backends import BACKENDS, backend
from qspec.backends.base import Runner
from qspec.compiler.errors import UserError
from qspec.compiler.folder import FORMAT_VERSION, MANIFEST, read_manifest, sha256_file

DAMAGED = "compile it again"


def open_target(folder: Path, entry: dict, inputs: list[str], threads: int = 0) -> Runner:
    """The runner of one entry of a manifest's `targets`."""
    return backend(entry["backend"]).open(folder, entry, inputs, threads)


def load(folder: str | Path, backend_name: str | None = None) -> Runner:
    """A callable over numpy arrays for the artifact in a build folder: the first target, or
    the one `backend_name` names (a backend, `tvm`, or a target's name, `tvm_sm80`)."""
    folder = Path(folder)
    try:
        _within(folder, MANIFEST)
        manifest = read_manifest(folder)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    targets, inputs = _runnable(manifest, folder)
    chosen = next((t for t in targets if backend_name in (None, t["backend"], t["name"])), None)
    if chosen is None:
        available = ", ".join(t["name"] for t in targets)
        raise UserError(f"the build has no {backend_name} artifact (it has: {available})")
    if chosen["backend"] not in BACKENDS:
        raise _damaged(folder, f"names an unknown backend {chosen['backend']!r}")
    for name in _artifact_files(chosen):
        _check_file(folder, name, _recorded_sha256(manifest, chosen, name))
    try:
        runner = open_target(folder, chosen, list(inputs))
    except (KeyError, TypeError) as error:  # a field the backend needs is missing or mistyped
        raise _damaged(folder, f"has a malformed target {chosen['name']} ({error})") from None
    except UserError:
        raise
    except Exception as error:  # ONNX Runtime and TVM raise types of their own for a bad file
        raise UserError(
            f"cannot load {folder / chosen['file']}: {_first_line(error)}", help=DAMAGED
        ) from None
    return CheckedRunner(runner, inputs)


def _runnable(manifest: dict[str, Any], folder: Path) -> tuple[list[dict], dict[str, dict]]:
    """The manifest's targets and inputs, once it is known to be one this qspec can run."""
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(folder, "has no format_version")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{folder} was written by a newer qspec (build format {version}; this qspec reads "
            f"up to {FORMAT_VERSION})",
            help="upgrade qspec, or compile the spec again with this one",
        )
    targets = manifest.get("targets")
    fields = ("backend", "name", "file")
    if (
        not isinstance(targets, list)
        or not targets
        or not all(
            isinstance(t, dict) and all(isinstance(t.get(f), str) for f in fields) for t in targets
        )
    ):
        raise _damaged(folder, "lists no valid targets")
    model = manifest.get("model")
    inputs = model.get("inputs") if isinstance(model, dict) else None
    if not isinstance(inputs, dict) or not all(
        isinstance(spec, dict)
        and isinstance(spec.get("dtype"), str)
        and isinstance(spec.get("dims"), int)
        for spec in inputs.values()
    ):
        raise _damaged(folder, "lacks model.inputs")
    return targets, inputs


def _artifact_files(entry: dict) -> list[str]:
    """The files a target's runner opens: its artifact and, for TVM, its parameters."""
    return [entry["file"], *([entry["params"]] if "params" in entry else [])]


def _recorded_sha256(manifest: dict[str, Any], entry: dict, name: object) -> list[object]:
    """Every hash the manifest records for a file: in its `files` map and in the target's own
    `sha256` (one hash, or one per file). They must all agree with the file."""
    if not isinstance(name, str):
        return []
    files = manifest.get("files")
    recorded = [files.get(name)] if isinstance(files, dict) and name in files else []
    own = entry.get("sha256")
    if isinstance(own, dict):
        recorded += [own[name]] if name in own else []
    elif own is not None and name == entry["file"]:
        recorded.append(own)
    return recorded


def _check_file(folder: Path, name: object, sha256: list[object]) -> None:
    """`name` is a file inside `folder` whose bytes hash as the manifest recorded."""
    if not isinstance(name, str) or not _inside(name):
        raise UserError(
            f"{folder}/{MANIFEST} names a file outside the build folder: {name!r}",
            help="qspec runs only files inside the build folder; " + DAMAGED,
        )
    path = _within(folder, name)
    if not path.is_file():
        what = "missing" if not path.exists() else "not a file"
        raise UserError(f"{path} is {what}: the build folder is incomplete", help=DAMAGED)
    if not sha256:
        raise _damaged(folder, f"records no sha256 for {name}")
    actual = sha256_file(path)
    if any(recorded != actual for recorded in sha256):
        raise UserError(f"build folder was modified: {name}", help=DAMAGED)


def _within(folder: Path, name: str) -> Path:
    """folder/name, where that does not lead out of the folder through a symlink."""
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UserError(
            f"{path} leads outside the build folder (a symlink)",
            help="qspec runs only files inside the build folder; " + DAMAGED,
        )
    return path


def _inside(name: str) -> bool:
    """A relative path that stays inside the folder it is joined to."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def _damaged(folder: Path, what: str) -> UserError:
    return UserError(f"{folder}/{MANIFEST} {what}: the build folder is damaged", help=DAMAGED)


class CheckedRunner:
    """A backend's runner that first checks each input against the manifest: its name, dtype
    and rank, and the fixed dimensions the runner knows (a backend's own error for a wrong
    input is not one a user can read)."""

    def __init__(self, runner: Runner, inputs: Mapping[str, Mapping[str, Any]]):
        self.runner, self.inputs = runner, inputs
        self.input_names = list(inputs)

    def __getattr__(self, name: str) -> Any:  # the backend runner's own attributes
        return getattr(self.runner, name)

    def primary(self, batch: Mapping) -> np.ndarray:
        return self.runner.primary(batch)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.inputs if name not in inputs]
        if missing:
            raise UserError(f"missing inputs {missing}; the model takes {list(self.inputs)}")
        fixed = getattr(self.runner, "input_shapes", {})
        feed = {name: np.asarray(inputs[name]) for name in self.inputs}
        for name, array in feed.items():
            _check_input(name, array, self.inputs[name], fixed.get(name))
        try:
            return self.runner(feed)
        except Exception as error:  # the checks passed: sizes the graph itself cannot take
            shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in feed.items())
            raise UserError(
                f"the model cannot run on these inputs ({shapes}): {_first_line(error)}",
                help="give inputs of the sizes the model was built for",
            ) from None


def _first_line(error: Exception) -> str:
    """The first line of a runtime's error (ONNX Runtime and TVM explain in pages)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _check_input(name: str, array: np.ndarray, spec: Mapping[str, Any], shape: list | None) -> None:
    """The input's dtype and rank as the manifest records them, and its fixed sizes."""
    sizes = shape if shape and len(shape) == array.ndim else [None] * array.ndim
    if (
        str(array.dtype) == spec["dtype"]
        and array.ndim == spec["dims"]
        and all(size in (None, got) for size, got in zip(sizes, array.shape, strict=True))
    ):
        return
    expected = f"{spec['dtype']} with {spec['dims']} dimensions"
    if shape:
        expected += " (shape " + "x".join("N" if s is None else str(s) for s in shape) + ")"
    raise UserError(
        f"input '{name}' is {array.dtype} of shape {list(array.shape)}; the model expects "
        + expected
    )
