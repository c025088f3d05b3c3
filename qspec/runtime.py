"""Load a build folder and run it with the backend's own runtime: `qspec.load(folder)`."""

from __future__ import annotations

from pathlib import Path

from qspec.backends import backend
from qspec.backends.base import Runner
from qspec.compiler.errors import UserError
from qspec.compiler.folder import read_manifest


def open_target(folder: Path, entry: dict, inputs: list[str], threads: int = 0) -> Runner:
    """The runner of one entry of a manifest's `targets`."""
    return backend(entry["backend"]).open(folder, entry, inputs, threads)


def load(folder: str | Path, backend_name: str | None = None) -> Runner:
    """A callable over numpy arrays for the artifact in a build folder: the first target, or
    the one `backend_name` names (a backend, `tvm`, or a target's name, `tvm_sm80`)."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    targets = manifest["targets"]
    chosen = next((t for t in targets if backend_name in (None, t["backend"], t["name"])), None)
    if chosen is None:
        available = ", ".join(t["name"] for t in targets)
        raise UserError(f"the build has no {backend_name} artifact (it has: {available})")
    return open_target(folder, chosen, list(manifest["model"]["inputs"]))
