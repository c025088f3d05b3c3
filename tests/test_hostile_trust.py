"""Hostile inputs to what qspec loads and runs: a .pt2 is data and never runs code; `qspec run`
and `qspec.load` open only intact files inside the build folder; inputs and outputs are checked
before use; nothing executable is read back from the cache folder. Each case: the input, the
exit code, a fragment of the message."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from projects import TINY_MODEL, write_project

from qspec.cli import main
from qspec.runtime import _check_input

BODY = (
    'target onnx { device cpu }\ntarget tvm { device llvm }\nlayer "fc*" { weight int4 group 32 }\n'
)
IDS = np.random.default_rng(0).integers(0, 50, (4, 6), dtype=np.int64)


def qspec(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real build (ONNX and TVM on the CPU) of the tiny model, and its inputs."""
    root = tmp_path_factory.mktemp("trust")
    spec = write_project(root / "project", TINY_MODEL, BODY)
    cache = str(root / "cache")
    assert main(["compile", str(spec), "-o", str(root / "build"), "--cache-dir", cache]) == 0
    np.savez(root / "in.npz", ids=IDS)
    return root


@pytest.fixture
def case(built: Path, tmp_path: Path) -> Path:
    """A private copy of the build, to corrupt."""
    shutil.copytree(built / "build", tmp_path / "build")
    return tmp_path / "build"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _target(manifest: dict, backend: str) -> dict:
    return next(t for t in manifest["targets"] if t["backend"] == backend)


def _forge(name: str, data: bytes) -> Callable[[Path], None]:
    """Replace a file and record its new hash: a forgery the hashes cannot catch."""

    def forge(folder: Path) -> None:
        (folder / name).write_bytes(data)
        digest = _sha256(folder / name)

        def record(manifest: dict) -> None:
            manifest["files"][name] = digest
            for target in manifest["targets"]:
                if isinstance(target["sha256"], dict) and name in target["sha256"]:
                    target["sha256"][name] = digest
                elif target["file"] == name:
                    target["sha256"] = digest

        _edit(record)(folder)

    return forge


def _link_outside(folder: Path) -> None:
    outside = folder.parent / "outside.onnx"
    shutil.copy(folder / "model.onnx", outside)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(outside)


def _truncate(name: str) -> Callable[[Path], None]:
    def truncate(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return truncate


def _replace_by_folder(folder: Path) -> None:
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").mkdir()


# (case, backend, change to the build folder, message fragment); every one exits 2.
BROKEN_BUILDS = [
    ("no manifest", "onnx", lambda f: (f / "manifest.json").unlink(), "not a qspec build folder"),
    (
        "manifest not JSON",
        "onnx",
        lambda f: (f / "manifest.json").write_text("{"),
        "not valid JSON",
    ),
    (
        "manifest not UTF-8",
        "onnx",
        lambda f: (f / "manifest.json").write_bytes(b"\xff"),
        "valid JSON",
    ),
    (
        "manifest a list",
        "onnx",
        lambda f: (f / "manifest.json").write_text("[]"),
        "not a JSON object",
    ),
    (
        "deep manifest",
        "onnx",
        lambda f: (f / "manifest.json").write_text("[" * 10**6),
        "valid JSON",
    ),
    (
        "future format",
        "onnx",
        _edit(lambda m: m.update(format_version=99)),
        "written by a newer qspec",
    ),
    ("no format", "onnx", _edit(lambda m: m.pop("format_version")), "has no format_version"),
    ("no targets", "onnx", _edit(lambda m: m.pop("targets")), "lists no valid targets"),
    ("no inputs", "onnx", _edit(lambda m: m["model"].pop("inputs")), "lacks model.inputs"),
    (
        "unknown backend",
        "onnx",
        _edit(lambda m: _target(m, "onnx").update(backend="evil")),
        "unknown backend 'evil'",
    ),
    (
        "path with ..",
        "onnx",
        _edit(lambda m: _target(m, "onnx").update(file="../outside.onnx")),
        "names a file outside the build folder: '../outside.onnx'",
    ),
    (
        "absolute path",
        "onnx",
        _edit(lambda m: _target(m, "onnx").update(file="/etc/hostname")),
        "names a file outside the build folder: '/etc/hostname'",
    ),
    (
        "absolute params",
        "tvm",
        _edit(lambda m: _target(m, "tvm").update(params="/etc/hostname")),
        "outside the build folder",
    ),
    ("symlink out", "onnx", _link_outside, "leads outside the build folder"),
    ("truncated model", "onnx", _truncate("model.onnx"), "build folder was modified: model.onnx"),
    (
        "edited params",
        "tvm",
        _truncate("tvm/params.bin"),
        "build folder was modified: tvm/params.bin",
    ),
    ("missing model", "onnx", lambda f: (f / "model.onnx").unlink(), "model.onnx is missing"),
    ("folder for model", "onnx", _replace_by_folder, "model.onnx is not a file"),
    (
        "target hash edited",
        "onnx",
        _edit(lambda m: _target(m, "onnx").update(sha256="0" * 64)),
        "build folder was modified: model.onnx",
    ),
    ("forged model", "onnx", _forge("model.onnx", b"not a model"), "cannot load"),
    ("forged library", "tvm", _forge("tvm/model.so", b"\x7fELF not a library"), "cannot load"),
    (
        "not a .so",
        "tvm",
        _edit(lambda m: _target(m, "tvm").update(file="report.md")),
        "not a .so library",
    ),
    (
        "malformed target",
        "tvm",
        _edit(lambda m: _target(m, "tvm").pop("param_names")),
        "malformed target tvm",
    ),
]


@pytest.mark.parametrize(
    ("backend", "change", "fragment"),
    [case[1:] for case in BROKEN_BUILDS],
    ids=[case[0] for case in BROKEN_BUILDS],
)
def test_a_broken_build_folder_is_refused(
    case: Path, built: Path, capsys, backend: str, change, fragment: str
):
    change(case)
    out = case.parent / "out.npz"
    argv = ["run", str(case), "--input", str(built / "in.npz"), "--output", str(out)]
    code, err = qspec(capsys, *argv, "--backend", backend)
    assert (code, fragment in err) == (2, True), err
    assert not out.exists()


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_an_intact_build_runs(case: Path, built: Path, capsys, backend: str):
    out = case.parent / "out.npz"
    argv = ["run", str(case), "--input", str(built / "in.npz"), "--output", str(out)]
    assert qspec(capsys, *argv, "--backend", backend)[0] == 0
    with np.load(out) as data:
        assert data["output"].shape == (4, 8)


# ---- inputs ------------------------------------------------------------------------------


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _pickle_payload(path: Path) -> None:
    """A pickle that would create a marker file beside it when unpickled."""
    path.write_bytes(pickle.dumps(_Marker(path.with_name("MARKER"))))


class _Marker:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _object_npz(path: Path) -> None:
    np.savez(path, ids=np.array([_Marker(path.with_name("MARKER"))], dtype=object))


# (case, how the --input file is made, message fragment); every one exits 2.
BAD_INPUTS = [
    ("float ids", _npz(ids=IDS.astype(np.float32)), "input 'ids' is float32 of shape [4, 6]"),
    ("int32 ids", _npz(ids=IDS.astype(np.int32)), "the model expects int64 with 2 dimensions"),
    ("rank 1", _npz(ids=IDS[0]), "input 'ids' is int64 of shape [6]"),
    ("rank 3", _npz(ids=IDS[None]), "the model expects int64 with 2 dimensions"),
    ("misnamed", _npz(tokens=IDS), "missing inputs ['ids']"),
    ("a .npy", lambda path: path.write_bytes(_npy(IDS)), "is a .npy array, not an .npz"),
    ("text", lambda path: path.write_text("ids = 1, 2, 3\n"), "cannot read"),
    ("broken zip", lambda path: path.write_bytes(b"PK\x03\x04" + b"\0" * 64), "cannot read"),
    ("a pickle", _pickle_payload, "cannot read"),
    ("object array", _object_npz, "cannot read"),
    ("a folder", lambda path: path.mkdir(), "not a regular file"),
    ("a FIFO", lambda path: os.mkfifo(path), "not a regular file"),
    ("missing", lambda path: None, "no such file"),
]


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
@pytest.mark.parametrize(
    ("make", "fragment"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_inputs_are_refused(
    built: Path, tmp_path: Path, capsys, make, fragment: str, backend: str
):
    given, out = tmp_path / "in.npz", tmp_path / "out.npz"
    make(given)
    argv = ["run", str(built / "build"), "--input", str(given), "--output", str(out)]
    code, err = qspec(capsys, *argv, "--backend", backend)
    assert (code, fragment in err) == (2, True), err
    assert not out.exists() and not (tmp_path / "MARKER").exists()


def test_fixed_sizes_are_checked():
    spec = {"dtype": "float32", "dims": 4}
    _check_input("image", np.zeros((3, 1, 28, 28), np.float32), spec, [None, 1, 28, 28])
    with pytest.raises(Exception, match=r"shape \[3, 1, 27, 28\].*\(shape Nx1x28x28\)"):
        _check_input("image", np.zeros((3, 1, 27, 28), np.float32), spec, [None, 1, 28, 28])


# ---- --output ----------------------------------------------------------------------------


def _run(built: Path, capsys, output: Path | str) -> tuple[int, str]:
    argv = ["run", str(built / "build"), "--input", str(built / "in.npz"), "--output"]
    return qspec(capsys, *argv, str(output))


def test_output_writes_through_a_symlink(built: Path, tmp_path: Path, capsys):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "result.npz"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "out.npz"
    link.symlink_to(target)
    assert _run(built, capsys, link)[0] == 0
    assert link.is_symlink() and link.resolve() == target
    with np.load(target) as data:
        assert data["output"].shape == (4, 8)
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out.npz", "real", "result.npz"]


BAD_OUTPUTS = [
    ("a folder", lambda path: path.mkdir(), "it is a folder"),
    ("a FIFO", lambda path: os.mkfifo(path), "not a regular file"),
    ("a link to a folder", lambda path: path.symlink_to(path.parent), "it is a folder"),
    ("a missing folder", lambda path: None, "no folder"),
]


@pytest.mark.parametrize(
    ("make", "fragment"), [c[1:] for c in BAD_OUTPUTS], ids=[c[0] for c in BAD_OUTPUTS]
)
def test_bad_outputs_are_refused(built: Path, tmp_path: Path, capsys, make, fragment: str):
    output = tmp_path / "out.npz"
    make(output)
    if fragment == "no folder":
        output = tmp_path / "missing" / "out.npz"
    code, err = _run(built, capsys, output)
    assert (code, "cannot write" in err, fragment in err) == (2, True, True), err
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_device_is_not_written(built: Path, capsys):
    code, err = _run(built, capsys, "/dev/full")
    assert (code, "not a regular file" in err) == (2, True), err


def test_the_input_file_is_never_the_output(built: Path, capsys):
    before = (built / "in.npz").read_bytes()
    code, err = _run(built, capsys, built / "in.npz")
    assert (code, "is the --input file" in err) == (2, True), err
    assert (built / "in.npz").read_bytes() == before


def test_a_failed_write_leaves_nothing(built: Path, tmp_path: Path, capsys, monkeypatch):
    (tmp_path / "out.npz").write_bytes(b"previous")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    code, err = _run(built, capsys, tmp_path / "out.npz")
    assert (code, "cannot write" in err, "No space left" in err) == (2, True, True), err
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]
    assert (tmp_path / "out.npz").read_bytes() == b"previous"


# ---- .pt2: data, never code ----------------------------------------------------------------


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


def _pt2(path: Path, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None):
    """A real torch.export.save archive, with members replaced or added."""
    torch.manual_seed(0)
    batch = {"x": {0: torch.export.Dim("batch")}}
    program = torch.export.export(_Small(), (torch.randn(2, 8),), dynamic_shapes=batch)
    good = path.with_suffix(".good.pt2")
    torch.export.save(program, good)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w") as archive:
        root = source.namelist()[0].split("/")[0]
        for info in source.infolist():
            member = info.filename.removeprefix(f"{root}/")
            archive.writestr(info, (replace or {}).get(member, source.read(info)))
        for member, data in (add or {}).items():
            archive.writestr(f"{root}/{member}", data)


def _marker_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Marker(marker), buffer)
    return buffer.getvalue()


def _exported_spec(folder: Path, archive: str) -> Path:
    np.savez(folder / "calib.npz", x=np.random.default_rng(0).standard_normal((48, 8), np.float32))
    spec = folder / "exported.qspec"
    spec.write_text(
        f'qspec 1\nmodel exported "{archive}"\ncalibration "calib.npz" samples 32 holdout 16\n'
        'target onnx { device cpu }\nlayer "fc" { weight int8 channel }\n'
    )
    return spec


PT2_CASES = [
    ("pickled example inputs", "sample_inputs", "does not unpickle objects from a .pt2"),
    ("opaque object member", "opaque", "which loading it would execute"),
    ("compiled library member", "aoti", "which loading it would execute"),
    ("not an archive", "text", "not a .pt2 archive"),
    ("damaged archive", "damaged", "cannot load exported program"),
]


@pytest.mark.parametrize(
    ("how", "fragment"), [c[1:] for c in PT2_CASES], ids=[c[0] for c in PT2_CASES]
)
def test_a_pt2_never_runs_code(tmp_path: Path, capsys, how: str, fragment: str):
    marker, archive = tmp_path / "MARKER", tmp_path / "model.pt2"
    payload = _marker_pickle(marker)
    if how == "sample_inputs":
        _pt2(archive, replace={"data/sample_inputs/model.pt": payload})
    elif how == "opaque":
        _pt2(archive, add={"data/constants/opaque_obj_0": payload})
    elif how == "aoti":
        _pt2(archive, add={"data/aotinductor/model/model.so": b"\x7fELF"})
    elif how == "damaged":
        archive.write_bytes(payload[4:])  # its zip directory is still found at the end
    else:
        archive.write_text("model = Model()\n")
    code, err = qspec(
        capsys, "compile", str(_exported_spec(tmp_path, "model.pt2")), "-o", str(tmp_path / "b")
    )
    assert (code, fragment in err, "model.pt2" in err) == (2, True, True), err
    assert not marker.exists()


def test_a_plain_pt2_still_compiles(tmp_path: Path, capsys):
    _pt2(tmp_path / "model.pt2")
    spec = _exported_spec(tmp_path, "model.pt2")
    assert qspec(capsys, "compile", str(spec), "-o", str(tmp_path / "b"))[0] == 0


# ---- the cache folder --------------------------------------------------------------------

PLANTED = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { fclose(fopen("MARKER_PATH", "w")); }
"""


@pytest.mark.skipif(
    shutil.which("nvcc") is None or shutil.which("cc") is None, reason="needs nvcc and cc"
)
def test_a_planted_driver_stub_is_never_loaded(tmp_path: Path, private_cache: Path):
    """The CUDA compile once loaded `cuda-driver-stub/libcuda.so.1` from the cache unchecked."""
    marker = tmp_path / "MARKER"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED.replace("MARKER_PATH", str(marker)))
    planted = private_cache / "cuda-driver-stub" / "libcuda.so.1"
    planted.parent.mkdir(parents=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(planted), str(source)], check=True)
    body = 'target tvm { device cuda arch sm_80 }\nlayer "fc*" { weight int4 group 32 }\n'
    spec = write_project(tmp_path / "project", TINY_MODEL, body)
    assert main(["compile", str(spec), "-o", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["targets"][0]["device_code"] == "fatbin (nvcc)"
    assert not marker.exists()


def test_corrupt_cache_entries_are_rebuilt_not_trusted(tmp_path: Path, private_cache: Path, capsys):
    """Damaged build-cache files and per-layer results are misses: the next build computes
    them again and comes out byte-identical."""
    spec = write_project(
        tmp_path / "project", TINY_MODEL, BODY.split("\n", 2)[0] + "\n" + BODY.split("\n", 2)[2]
    )
    assert main(["compile", str(spec), "-o", str(tmp_path / "first")]) == 0
    payloads = list((private_cache / "layers").rglob("*.safetensors"))
    assert payloads
    for payload in payloads:
        data = bytearray(payload.read_bytes())
        data[-1] ^= 0xFF
        payload.write_bytes(bytes(data))
    (cached_model,) = (private_cache / "builds").rglob("files/model.onnx")
    cached_model.write_bytes(b"planted")
    capsys.readouterr()
    assert main(["compile", str(spec), "-o", str(tmp_path / "second"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == "miss"
    first, second = (tmp_path / name / "model.onnx" for name in ("first", "second"))
    assert second.read_bytes() == first.read_bytes()
    assert all(payload.read_bytes()[-1:] != b"" for payload in payloads)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update(format_version=10**400), "build format this qspec does not read"),
        (lambda m: m.pop("layers"), "is damaged (no 'layers')"),
        (lambda m: m.update(spec=[]), "is damaged"),
    ],
)
def test_explain_build_refuses_a_manifest_it_cannot_read(
    built: Path, case: Path, capsys, edit, fragment
):
    manifest = json.loads((case / "manifest.json").read_text())
    edit(manifest)
    (case / "manifest.json").write_text(json.dumps(manifest))
    spec = built / "project" / "tiny.qspec"
    code, err = qspec(capsys, "explain", str(spec), "--build", str(case))
    assert (code, fragment in err) == (2, True), err


def test_the_output_never_lands_inside_the_build_it_runs(built: Path, case: Path, capsys):
    argv = ["run", str(case), "--input", str(built / "in.npz"), "--output"]
    code, err = qspec(capsys, *argv, str(case / "model.onnx"))
    assert (code, "inside the build folder it runs" in err) == (2, True), err
