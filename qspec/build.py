"""`qspec compile` as a build step: the output folder's checks, the build cache, `--check` and
the depfile around the driver. The driver (and with it torch and the user's code) is imported
only when a build must run: a cache hit or an up-to-date check never loads them."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qspec import buildcache
from qspec.compiler.cache import content_cache_enabled
from qspec.compiler.errors import CompileFailure, UserError
from qspec.compiler.folder import (
    MANIFEST,
    check_replaceable,
    check_writable,
    locked,
    output_folder,
    read_manifest,
    sha256_file,
    staged,
    umask,
)
from qspec.compiler.inputs import depfile_text
from qspec.dsl import ir
from qspec.dsl.diagnostics import SpecError
from qspec.dsl.load import check_file

# --fail-under names and the fidelity fields they read
FIDELITY_FIELDS = {"cosine": "cosine_mean", "snr": "snr_db", "top1": "top1_agreement"}


@dataclass
class Outcome:
    """A build folder that is now in place, and how it got there."""

    folder: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    cache: str  # "up to date" (nothing done), "hit", "miss" or "off"
    timings: dict[str, float] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)  # measured when it was built


def fidelity_floors_missed(fidelity: dict[str, Any] | None, floors: dict[str, float]) -> list[str]:
    """Each `--fail-under METRIC=VALUE` the fidelity does not reach (all, without fidelity)."""
    missed = []
    for name, floor in floors.items():
        value = None if fidelity is None else fidelity.get(FIDELITY_FIELDS.get(name, name))
        value = None if value is None else float(value)  # report.json writes NaN as "nan"
        if value is None or not value >= floor:  # NaN is below every floor
            missed.append(f"{name} {value} < {floor}")
    return missed


def _spec(spec_path: str | Path) -> tuple[ir.Spec, dict[str, str]]:
    checked = check_file(spec_path)
    return checked.raise_errors(), checked.sources


def build(
    spec_path: str | Path,
    out_dir: str,
    *,
    fail_under: dict[str, float] | None = None,
    depfile: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """Bring `out_dir` up to date with the spec: from the cache when an entry matches the
    spec and the content of every input, else by compiling (and then filling the cache)."""
    spec, sources = _spec(spec_path)
    out = output_folder(out_dir)
    try:
        check_replaceable(out, [Path(path) for path in spec.files])
        check_writable(out)
        if depfile is not None:
            _check_depfile(Path(depfile), out)
        outcome = _build(spec, out, fail_under or {}, log)
    except UserError as error:
        raise SpecError([error.diagnostic], sources) from error
    if depfile is not None:
        _write_depfile(Path(depfile), os.path.join(out_dir, MANIFEST), outcome.inputs)
    return outcome


def _build(
    spec: ir.Spec, out: Path, fail_under: dict[str, float], log: Callable[[str], None]
) -> Outcome:
    """Under the folder's lock from the first look to the cache's copy: compiles of one folder
    take turns, and what is stored is what this compile built."""
    with locked(out, log):
        return _build_locked(spec, out, fail_under, log)


def _build_locked(
    spec: ir.Spec, out: Path, fail_under: dict[str, float], log: Callable[[str], None]
) -> Outcome:
    spec_dir = Path(spec.path).resolve().parent
    action = buildcache.action_key(spec)
    start = time.perf_counter()
    if content_cache_enabled() and _staleness(spec, out) is None:
        os.utime(out / MANIFEST)  # nothing to do but tell build tools the folder is new enough
        manifest, report = _read_build(out)
        _fail_if_short(report, fail_under)
        return Outcome(out, manifest, report, "up to date", {}, _inputs(spec, manifest["inputs"]))
    entry = buildcache.lookup(action, spec_dir) if content_cache_enabled() else None
    if entry is not None:
        with staged(out, log) as stage:
            buildcache.restore(entry, stage)
            manifest, report = _read_build(stage)
            _fail_if_short(report, fail_under)
        log(f"restored from the cache: {time.perf_counter() - start:.2f} s")
        seconds = {"restore": time.perf_counter() - start}
        inputs = _inputs(spec, entry.inputs)
        return Outcome(out, manifest, report, "hit", seconds, inputs, entry.latency_ms)
    from qspec.driver import compile_spec  # torch and the user's code load from here on

    built = compile_spec(spec.path, out, fail_under=fail_under, log=log)
    cache = "off"
    if content_cache_enabled():
        buildcache.store(action, out, built.manifest, built.latency_ms)
        cache = "miss"
    return Outcome(
        out, built.manifest, built.report, cache, built.timings, built.inputs, built.latency_ms
    )


def _inputs(spec: ir.Spec, recorded: dict[str, str]) -> list[Path]:
    """What a depfile lists for a build done earlier: the spec's files and its recorded inputs
    (relative to the spec's folder)."""
    spec_dir = Path(spec.path).resolve().parent
    recorded_paths = [Path(os.path.normpath(spec_dir / path)) for path in recorded]
    return [Path(path).resolve() for path in spec.files] + recorded_paths


def _read_build(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return read_manifest(folder), json.loads((folder / "report.json").read_text())


def _fail_if_short(report: dict[str, Any], fail_under: dict[str, float]) -> None:
    missed = fidelity_floors_missed(report.get("fidelity"), fail_under)
    if missed:
        raise CompileFailure(
            "fidelity below --fail-under: "
            + ", ".join(missed)
            + "; the previous build, if any, is unchanged"
        )


def up_to_date(spec_path: str | Path, out_dir: str) -> tuple[bool, str]:
    """Whether `out_dir` holds the build the spec would give now, and why not. Writes
    nothing, loads no model."""
    spec, _ = _spec(spec_path)
    stale = _staleness(spec, output_folder(out_dir))
    return stale is None, stale or f"{out_dir} is up to date"


def _staleness(spec: ir.Spec, out: Path) -> str | None:
    """Why `out` is not the build the spec would give now (a changed spec or tool, a changed
    or deleted input, a changed file in the folder), or None when it is."""
    try:
        manifest = read_manifest(out)
    except (OSError, ValueError):
        return f"{out} holds no build"
    if manifest.get("build", {}).get("key") != buildcache.action_key(spec):
        return "the spec, qspec or a tool changed since the build"
    spec_dir = Path(spec.path).resolve().parent
    changed = buildcache.changed_inputs(manifest.get("inputs", {}), spec_dir)
    if changed:
        return "inputs changed: " + ", ".join(changed)
    for name, digest in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file() or sha256_file(path) != digest:
            return f"{path} was changed or removed"
    return None


def _check_depfile(depfile: Path, out: Path) -> None:
    """The depfile must be outside the build folder and, if it exists, one qspec wrote."""
    if depfile.resolve().is_relative_to(out.resolve()):
        raise UserError(
            f"--depfile {depfile} is inside the build folder, which a build replaces",
            help=f"write it beside the folder: --depfile {out}.d",
        )
    if depfile.exists() and not _is_depfile(depfile):
        raise UserError(
            f"--depfile {depfile} exists and is not a depfile qspec wrote: it stays as it is",
            help=f"name a new file, such as --depfile {out}.d",
        )
    try:  # written after the build: a place it cannot go is reported now
        depfile.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=depfile.parent, prefix=f".{depfile.name}.probe-"):
            pass
    except OSError as error:
        raise UserError(f"cannot write the depfile {depfile}: {error.strerror}") from None


def _is_depfile(path: Path) -> bool:
    """An empty file or one whose first line is qspec's rule (a FIFO or device is neither, and
    is never opened: reading one could block forever)."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            first = handle.readline(4096)
    except OSError:
        return False
    return first.rstrip(b" \\\r\n").endswith(MANIFEST.encode() + b":") or not first


def _write_depfile(path: Path, target: str, inputs: Sequence[Path]) -> None:
    """Write the depfile in one rename, so a build tool never reads half of one."""
    try:
        text = depfile_text(target, sorted(set(inputs)))
    except ValueError as error:
        raise UserError(str(error)) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            handle.write(text)
        os.chmod(handle.name, 0o666 & ~umask())
        os.replace(handle.name, path)
    except OSError as error:
        raise UserError(f"cannot write the depfile {path}: {error.strerror}") from None
