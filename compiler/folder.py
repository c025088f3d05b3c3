"""The build folder. qspec replaces only folders it wrote; a build is written in a hidden staging
sibling and swapped into place in one step, under a lock, so that an interrupted or failed build
leaves the previous build exactly as it was, and two compiles to one folder never mix.

Hidden siblings of `DIR`, all removed or restored by the next compile under the lock:
`.DIR.lock` (the lock file, kept), `.DIR.building-*` (staging), `.DIR.old-*` (a previous build
between the two renames of a filesystem without an atomic exchange).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from qspec.compiler.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LOCK_TIMEOUT_S = 900.0  # how long a second compile of one folder waits (QSPEC_LOCK_TIMEOUT)
MIN_FREE_BYTES = 64 << 20  # less free space than this at the output is reported up front
_held: set[Path] = set()  # the build folders whose lock this process holds


def check_replaceable(
    out_dir: Path, keep: Sequence[Path] = (), ours: Callable[[Path], bool] | None = None
) -> None:
    """Raise a UserError unless a build may replace `out_dir`: it must not exist, be an empty
    folder, or be a folder qspec wrote (`ours`, by default a build folder), and it must not
    hold the current folder or a file in `keep` (the spec). qspec never removes what it did
    not write."""
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
    extra = _added_to_build(out_dir) if ours is None and out_dir.is_dir() else None
    if out_dir.is_dir() and (extra == [] or (ours is not None and ours(out_dir))):
        return
    what = "a file" if not out_dir.is_dir() else "a folder that is not a qspec build"
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        what = f"a qspec build that also holds {shown}, which qspec did not write"
    raise UserError(
        f"-o {given!r} is {what}: qspec replaces only empty folders and its own builds",
        help="choose another output folder, or remove it yourself",
    )


def output_folder(out_dir: str | Path) -> Path:
    """-o as a path; '' (an unset shell variable) must not become the current folder."""
    if not str(out_dir).strip():
        raise UserError("-o '' names no folder (an unset variable?)", help="use -o build/NAME")
    return Path(out_dir)


def check_writable(out_dir: Path) -> None:
    """Fail now, not after minutes of work, where the build could not be written: the parent
    cannot be created or written, or its disk is (nearly) full."""
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent, prefix=f".{out_dir.name}.probe-") as probe:
            probe.write(b"qspec")
            probe.flush()
            os.fsync(probe.fileno())
        free = shutil.disk_usage(parent).free
    except OSError as error:
        raise cannot_write(out_dir, error) from None
    if free < MIN_FREE_BYTES:
        raise UserError(
            f"cannot write {out_dir}: only {free >> 20} MiB free on its disk",
            help="free some space or choose another output folder",
        )


def cannot_write(out_dir: Path, error: OSError) -> UserError:
    reason = error.strerror or str(error)
    if error.errno == errno.EEXIST:  # a file stands where a folder on the path must be
        reason = "a file is in the way of a folder on that path"
    return UserError(f"cannot write {out_dir}: {reason}", help="choose another output folder")


def _added_to_build(folder: Path) -> list[str] | None:
    """What a user added to a build folder: paths (relative, POSIX) that are neither its
    manifest, nor a file the manifest lists, nor a folder on the way to one. None where the
    folder is no build at all. A build holding anything else is the user's to remove."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return None
    listed = manifest.get("files")
    if "format_version" not in manifest or not isinstance(listed, dict):
        return None
    ours = {MANIFEST, *map(str, listed)}
    parents = {str(parent) for name in ours for parent in PurePosixPath(name).parents}
    return sorted(
        relative
        for path in folder.rglob("*")
        if (relative := path.relative_to(folder).as_posix()) not in ours
        and not (relative in parents and path.is_dir() and not path.is_symlink())
    )


@contextmanager
def locked(out_dir: Path, log: Callable[[str], None] = lambda _: None) -> Iterator[None]:
    """Hold `.DIR.lock` (an advisory lock the kernel drops when the process dies): a second
    compile of the same folder waits for the first, up to $QSPEC_LOCK_TIMEOUT seconds. Holding
    it already (a whole build step around the swap) is fine."""
    out_dir = out_dir.resolve()
    if out_dir in _held:
        yield
        return
    try:
        timeout = float(os.environ.get("QSPEC_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    except ValueError:
        raise UserError("QSPEC_LOCK_TIMEOUT must be a number of seconds") from None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir.with_name(f".{out_dir.name}.lock"), "a+")  # noqa: SIM115
    except OSError as error:
        raise cannot_write(out_dir, error) from None
    with handle:
        deadline, waiting = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"{out_dir} is being built by another qspec process; gave up after "
                        f"{timeout:.0f} s",
                        help="wait for it, or raise QSPEC_LOCK_TIMEOUT (seconds)",
                    ) from None
                if not waiting:
                    log(f"waiting for another qspec compile of {out_dir}")
                    waiting = True
                time.sleep(0.2)
        _held.add(out_dir)
        try:
            _recover(out_dir)
            yield
        finally:
            _held.discard(out_dir)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recover(out_dir: Path) -> None:
    """Under the lock no other build is running: leftovers are from killed ones. A previous
    build caught between the two renames goes back into place; staging folders go."""
    parent, name = out_dir.parent, re.escape(out_dir.name)
    ours = re.compile(rf"\.{name}\.(building-[a-z0-9_]{{8}}|old-[0-9]+)")  # as named below
    leftovers = [path for path in parent.iterdir() if ours.fullmatch(path.name) and path.is_dir()]
    for stale in leftovers:
        if ".building-" in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    retired = sorted(
        (path for path in leftovers if ".old-" in path.name), key=lambda p: p.stat().st_mtime
    )
    if retired and not out_dir.exists():
        os.replace(retired.pop(), out_dir)
    for old in retired:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(out_dir: Path, log: Callable[[str], None] = lambda _: None) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an exception the staging
    folder replaces `out_dir` (only where `check_replaceable` allows it). Files whose bytes did
    not change keep their old inode and mtime, so build tools see them unchanged."""
    check_replaceable(out_dir)
    out_dir = out_dir.resolve()
    with locked(out_dir, log):
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        except OSError as error:
            raise cannot_write(out_dir, error) from None
        try:
            os.chmod(stage, 0o777 & ~umask())
            yield stage
            if out_dir.exists():
                _keep_unchanged(out_dir, stage)
            _swap_in(stage, out_dir)
        except OSError as error:
            raise cannot_write(out_dir, error) from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _keep_unchanged(old: Path, new: Path) -> None:
    """Replace each new file whose bytes equal the old build's by a hard link to the old file
    (a copy keeping its mtime where links are not possible). The manifest is always new."""
    for path in new.rglob("*"):
        relative = path.relative_to(new)
        before = old / relative
        if (
            str(relative) == MANIFEST
            or not path.is_file()
            or not before.is_file()
            or before.is_symlink()
            or before.stat().st_size != path.stat().st_size
            or sha256_file(before) != sha256_file(path)
        ):
            continue
        twin = path.with_name(f".{path.name}.same")
        try:
            os.link(before, twin)
        except OSError:
            shutil.copy2(before, twin)
        os.replace(twin, path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _swap_in(stage: Path, out_dir: Path) -> None:
    """Put `stage` at `out_dir`. With an old build there, Linux exchanges the two in one atomic
    step; elsewhere two renames, with the old build parked as `.DIR.old-PID` in between (the
    next compile puts it back if a kill lands between them)."""
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    if _exchange(stage, out_dir):
        return  # the old build is now at `stage`, which the caller removes
    retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, retired)
    os.replace(stage, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def write_json(path: Path, data: object) -> None:
    """Strict JSON: a NaN or infinity left in `data` is a qspec bug, not a bare token."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class BadManifest(UserError, ValueError):
    """A manifest that is there but cannot be read as one: a user error (exit 2) to the CLI,
    a ValueError to callers that only ask whether a folder holds a build."""


MAX_MANIFEST_BYTES = 64 << 20  # far above any real manifest; a bigger file is not one


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as a JSON object. FileNotFoundError where there is none; BadManifest where
    it cannot be read or is not a JSON object (a damaged folder, not a qspec bug)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a qspec build folder (no {MANIFEST})")
    help = "compile the spec again"
    try:
        text = path.read_bytes() if path.stat().st_size <= MAX_MANIFEST_BYTES else None
    except OSError as error:
        raise BadManifest(f"cannot read {path}: {error.strerror or error}", help=help) from None
    if text is None:
        raise BadManifest(f"{path} is too large to be a qspec manifest", help=help)
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep
        raise BadManifest(f"{path} is not valid JSON ({error})", help=help) from None
    if not isinstance(manifest, dict):
        raise BadManifest(f"{path} is not a JSON object", help=help)
    return manifest
