"""Property tests over hostile inputs that reach past the parser, on the digits CNN:

- random calibration arrays (any dtype, shape, NaN/Inf/huge mix) given to `compile`;
- random corruptions of a real build folder given to `qspec run`;
- grammar-aware mutations of a real spec compiled end to end.

Whatever the input, the command ends within a time limit with exit 0, 1 or 2 and a one-line
message, never exit 3 (an internal error) and never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qspec.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn"
LIMIT = 60  # seconds for one command: a hang fails the test instead of stalling the suite
USER_OUTCOMES = {0, 1, 2}
FUZZ = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so qspec's own handlers cannot swallow it."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def qspec(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and stderr of one in-process `qspec` command, under the time limit."""
    capsys.readouterr()
    with time_limit(LIMIT):
        code = main(list(argv))
    return code, capsys.readouterr().err


def assert_user_outcome(code: int, err: str) -> None:
    assert code in USER_OUTCOMES, err
    assert "Traceback" not in err and "internal error" not in err, err


def project(folder: Path, spec: str) -> Path:
    """The digits example's model and weights in `folder`, with `spec` beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.py", "digits_cnn.safetensors", "digits.npz"):
        target = folder / name
        if not target.exists():
            shutil.copy(DIGITS / name, target)
    path = folder / "digits.qspec"
    path.write_text(spec)
    return path


CALIBRATED = """qspec 1
model "model.py:load"
calibration "data.npz" samples 16 holdout 8
target onnx { device cpu }
layer "conv3" { weight int4 channel }
layer "fc" { weight int8 }
"""

FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
DTYPES = st.sampled_from(["float32", "float64", "float16", "int64", "uint8", "bool"])


@st.composite
def calibration_arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """A `pixels` array that is right in shape but hostile in values, or wrong in shape and
    dtype; sometimes labels too."""
    if draw(st.booleans()):
        rows = draw(st.integers(0, 40))
        shape: tuple[int, ...] = (rows, 1, 8, 8)
        dtype = "float32"
    else:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=9))
        dtype = draw(DTYPES)
    elements = FLOATS if dtype.startswith("float") else None
    pixels = draw(hnp.arrays(dtype, shape, elements=elements))
    arrays = {"pixels": pixels}
    if draw(st.booleans()) and pixels.ndim:
        arrays["labels"] = draw(hnp.arrays("int64", (len(pixels),), elements=st.integers(-3, 12)))
    return arrays


@FUZZ
@given(arrays=calibration_arrays())
def test_random_calibration_arrays_never_crash_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arrays: dict[str, np.ndarray]
) -> None:
    spec = project(tmp_path / "project", CALIBRATED)
    np.savez(spec.parent / "data.npz", **arrays)
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    code, err = qspec(capsys, "compile", str(spec), "-o", str(out), "--progress=never")
    assert_user_outcome(code, err)
    pixels = arrays["pixels"]
    if pixels.dtype.kind == "f" and pixels.size and not np.isfinite(pixels).all():
        assert code == 2, f"non-finite calibration data was accepted:\n{err}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real digits build folder and an input file for `qspec run`."""
    folder = tmp_path_factory.mktemp("digits")
    spec = project(folder, CALIBRATED.replace('"data.npz" samples 16 holdout 8', '"digits.npz"'))
    assert main(["compile", str(spec), "-o", str(folder / "build"), "--no-cache"]) == 0
    pixels = np.load(DIGITS / "digits.npz")["pixels"][:5]
    np.savez(folder / "in.npz", pixels=pixels)
    return folder


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path, offset: int) -> None:
    path.write_bytes(path.read_bytes()[: offset % max(path.stat().st_size, 1)])


def _replace_by_folder(path: Path, offset: int) -> None:
    path.unlink()
    path.mkdir()


def _link_outside(path: Path, offset: int) -> None:
    outside = path.parents[1] / f"outside-{path.name}"
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)


def _edit_manifest(path: Path, offset: int) -> None:
    """One hostile edit of the manifest (whatever `path` is): a field running needs dropped, a
    version from the future, an artifact path leaving the folder, a wrong hash, a non-object."""
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    target = manifest["targets"][0]
    edits = [
        lambda: manifest.pop(("format_version", "targets", "model")[offset % 3]),
        lambda: manifest.update(format_version=999),
        lambda: target.update(file="../model.onnx"),
        lambda: target.update(file="/etc/hostname"),
        lambda: target.update(sha256="0" * 64),
        lambda: target.pop("file"),
    ]
    edits[offset % len(edits)]()
    manifest_path.write_text(json.dumps(manifest if offset % 7 else [manifest]))


CORRUPTIONS = {
    "flip": _flip,
    "truncate": _truncate,
    "folder": _replace_by_folder,
    "link": _link_outside,
    "manifest": _edit_manifest,
}


@FUZZ
@given(
    victim=st.sampled_from(["model.onnx", "manifest.json"]),
    corruption=st.sampled_from(sorted(CORRUPTIONS)),
    offset=st.integers(0, 10**6),
)
def test_corrupted_build_folders_are_refused(
    built: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    victim: str,
    corruption: str,
    offset: int,
) -> None:
    folder = tmp_path / "case" / "build"
    shutil.rmtree(folder.parent, ignore_errors=True)
    shutil.copytree(built / "build", folder)
    CORRUPTIONS[corruption](folder / victim, offset)
    out = tmp_path / "case" / "out.npz"
    code, err = qspec(
        capsys, "run", str(folder), "--input", str(built / "in.npz"), "--output", str(out)
    )
    assert_user_outcome(code, err)
    # A flipped byte in a manifest field that running does not read may still run.
    if victim == "model.onnx" or corruption not in ("flip",):
        assert code == 2, f"a {corruption} of {victim} was run:\n{err}"
    assert out.exists() == (code == 0)


# Grammar-aware edits of a real spec: each replaces one piece with a legal-looking but
# hostile alternative, so the mutant gets past the parser into resolve, the passes and emit.
BASE = """qspec 1
model "model.py:load"
calibration "digits.npz" samples SAMPLES holdout HOLDOUT
target TARGET
defaults { weight int4 channel asymmetric }
layer PATTERN {
  RULE
}
"""
PIECES = {
    "SAMPLES": ["256", "1", "0", "100000", "1e9", "3"],
    "HOLDOUT": ["200", "0", "1", "1797", "100000"],
    "TARGET": [
        "onnx { device cpu }",
        "onnx { device cpu opset 7 }",
        "onnx { device cpu opset 99 }",
        "tvm { device llvm }",
        "onnx { device cuda }",
    ],
    "PATTERN": ['"conv1"', '"nothing"', '"*"', 're"conv[0-9]"', 're"(a+)+$"', '"fc"'],
    "RULE": [
        "keep",
        "weight int2 group 3",
        "weight int8 group 1000000",
        "weight nf4 group 16",
        "weight fp8_e4m3 channel",
        "weight int4 channel\n  sparsity 2:4",
        "sparsity 90%",
        "weight int4 channel\n  compensate lora rank 1000000000",
        "weight int4 channel round gptq",
        "weight choose [int4 channel, int8 channel]",
        "activation int8 token dynamic",
    ],
}


@FUZZ
@given(
    choice=st.fixed_dictionaries({key: st.sampled_from(values) for key, values in PIECES.items()})
)
def test_spec_mutants_compile_or_fail_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], choice: dict[str, str]
) -> None:
    text = BASE
    for key, value in choice.items():
        text = text.replace(key, value)
    spec = project(tmp_path / "project", text)
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    code, err = qspec(capsys, "compile", str(spec), "-o", str(out), "--progress=never")
    assert_user_outcome(code, err)
    if code == 2:
        assert err.strip(), "exit 2 without a message"
    if code == 0:
        assert json.loads((out / "manifest.json").read_text())["format_version"]
    staging = [
        name for name in os.listdir(tmp_path) if name.startswith((".out.building", ".out.old"))
    ]
    assert not staging, f"left behind: {staging}"
