"""The build folder: written in a temporary sibling and renamed into place at the end, so an
interrupted build never leaves a folder that looks complete, and an earlier build stays intact
until the new one is whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qspec.compiler.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def check_replaceable(out_dir: Path, keep: Sequence[Path] = ()) -> None:
    """Raise a UserError unless a build may replace `out_dir`: it must not exist, be an empty
    folder, or be a qspec build folder, and it must not hold the current folder or a file in
    `keep` (the spec). qspec never removes what it did not write."""
    given, out_dir = str(out_dir), out_dir.resolve()
    if Path.cwd().resolve().is_relative_to(out_dir):
        raise UserError(
            f"-o {given!r} is the current folder or one of its parents: a build replaces its "
            "output folder",
            help="give the build a folder of its own, such as -o build/NAME",
        )
    if any(path.resolve().is_relative_to(out_dir) for path in keep):
        raise UserError(f"-o {given!r} holds the spec itself", help="use -o build/NAME")
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if out_dir.is_dir() and _is_build(out_dir):
        return
    what = "a file" if not out_dir.is_dir() else "a folder that is not a qspec build"
    raise UserError(
        f"-o {given!r} is {what}: qspec replaces only empty folders and its own builds",
        help="choose another output folder, or remove it yourself",
    )


def _is_build(folder: Path) -> bool:
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `out_dir` in one rename (only
    where `check_replaceable` allows it)."""
    check_replaceable(out_dir)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    prefix = f".{out_dir.name}.building-{os.getpid()}-"
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    retired = None
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, retired)
    os.replace(stage, out_dir)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _remove_stale(out_dir: Path) -> None:
    """Staging folders of builds that were killed: their process is gone."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.building-*"):
        pid = stale.name.rsplit(".building-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a qspec build folder (no {MANIFEST})")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest
