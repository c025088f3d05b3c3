"""Hostile and broken numbers: calibration files and entries, non-finite values, overflowing
models and what verification reports. Each bad input is exit 2 located at the spec line (or
exit 1 for a build that fails on good data), never a hang, a traceback (exit 3) or a pass."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qspec.build import fidelity_floors_missed
from qspec.cli import main
from qspec.verify import compare

# Two Linear layers over x [N, 16], and variants that misbehave.
MODEL = """
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Only8(M):
    def forward(self, x):
        assert x.shape[0] == 8, "batch 8 only"
        return super().forward(x)


class Overflow(M):
    def forward(self, x):
        return self.fc2(torch.exp(self.fc1(x) * 100))


class Exact(M):
    # Weights on the int8 per-channel grid (k / 64, each row reaching 127 / 64): the
    # lowered layers compute exactly the float layers, a per-layer SNR of infinity.

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                codes = torch.randint(-127, 128, fc.weight.shape).float()
                codes[:, 0] = 127
                fc.weight.copy_(codes / 64)


class Loud(M):
    def forward(self, x):
        return super().forward(x) * 1e30


def _made(cls, rows=4):
    torch.manual_seed(0)
    return cls(), (torch.randn(rows, 16),)


def load():
    return _made(M)


def load8():
    return _made(Only8, 8)


def overflow():
    return _made(Overflow)


def loud():
    return _made(Loud)


def exact():
    return _made(Exact)


def batches8():
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        yield {"x": torch.randn(8, 16, generator=generator)}


def nan_batch():
    for index, batch in enumerate(batches8()):
        if index == 2:
            batch["x"][1, 0] = float("nan")
        yield batch


def not_iterable():
    return 5


def midway():
    yield {"x": torch.randn(8, 16)}
    raise RuntimeError("disk gone")


def numbers():
    yield 7
"""

BODY = "defaults {\n  weight int8 channel\n}\n"
ROWS = np.random.default_rng(0).normal(size=(48, 16)).astype("f4")


def _with(index: tuple[int, int], value: float) -> np.ndarray:
    rows = ROWS.copy()
    rows[index] = value
    return rows


def _npz(**arrays) -> Callable[[Path], None]:
    return lambda folder: np.savez(folder / "data.npz", **arrays)


def _truncated_npz(folder: Path) -> None:
    np.savez(folder / "data.npz", x=ROWS)
    data = (folder / "data.npz").read_bytes()
    (folder / "data.npz").write_bytes(data[: len(data) // 2])


def _truncated_safetensors(folder: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"x": ROWS}, str(folder / "data.safetensors"))
    data = (folder / "data.safetensors").read_bytes()
    (folder / "data.safetensors").write_bytes(data[: len(data) - 100])


class _Trap:
    """Unpickling this creates the marker file: proof that a data file was unpickled."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _object_array(folder: Path) -> None:
    _Trap.marker = folder / "unpickled"
    np.savez(folder / "data.npz", x=np.array([_Trap(), _Trap()], dtype=object))


NPZ = '"data.npz" samples 32 holdout 16'

# id, model entry, calibration statement, data writer, exit code, message fragment
CASES = [
    ("inf", "load", NPZ, _npz(x=_with((3, 2), np.inf)), 2, "data.npz: array 'x' has inf at [3, 2]"),
    ("-inf", "load", NPZ, _npz(x=_with((5, 1), -np.inf)), 2, "array 'x' has -inf at [5, 1]"),
    ("nan-held-out", "load", NPZ, _npz(x=_with((40, 2), np.nan)), 2, "has NaN at [40, 2]"),
    (
        "nan-label",
        "load",
        NPZ,
        _npz(x=ROWS, labels=np.where(np.arange(48) == 7, np.nan, 1.0)),
        2,
        "array 'labels' has NaN at [7]",
    ),
    (
        "nan-entry",
        "load",
        '"model.py:nan_batch" samples 16 holdout 16',
        None,
        2,
        "calibration input 'x' has NaN at [1, 0] in batch 2 of model.py:nan_batch",
    ),
    (
        "corrupt-npz",
        "load",
        NPZ,
        lambda f: (f / "data.npz").write_bytes(b"PK\x03\x04 not a zip"),
        2,
        "cannot read 'data.npz'",
    ),
    ("truncated-npz", "load", NPZ, _truncated_npz, 2, "cannot read 'data.npz'"),
    (
        "npy-named-npz",
        "load",
        NPZ,
        lambda f: np.save(open(f / "data.npz", "wb"), ROWS),  # noqa: SIM115
        2,
        "cannot read 'data.npz': not an .npz archive",
    ),
    (
        "corrupt-safetensors",
        "load",
        '"data.safetensors" samples 32 holdout 16',
        lambda f: (f / "data.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{bad json}" * 2),
        2,
        "cannot read 'data.safetensors'",
    ),
    (
        "truncated-safetensors",
        "load",
        '"data.safetensors" samples 32 holdout 16',
        _truncated_safetensors,
        2,
        "cannot read 'data.safetensors'",
    ),
    ("0-d", "load", NPZ, _npz(x=np.float32(3)), 2, "data.npz: array 'x' is a 0-d scalar"),
    ("object", "load", NPZ, _object_array, 2, "cannot read array 'x' of 'data.npz'"),
    ("strings", "load", NPZ, _npz(x=np.array(["a", "b"])), 2, "has dtype <U1, not numbers"),
    ("no-inputs", "load", NPZ, _npz(labels=np.arange(48)), 2, "holds no input arrays"),
    (
        "label-rows",
        "load",
        NPZ,
        _npz(x=ROWS, labels=np.arange(40)),
        2,
        "different lengths ('x' 48, 'labels' 40)",
    ),
    (
        "holdout-0",
        "load",
        '"data.npz" samples 32 holdout 0',
        _npz(x=ROWS),
        2,
        "holdout must be at least 1",
    ),
    (
        "2-d-labels",
        "load",
        NPZ,
        _npz(x=ROWS, labels=np.zeros((48, 2), "i8")),
        2,
        "array 'labels' is torch.int64 of shape [48, 2], not one class index per sample",
    ),
    (
        "float-labels",
        "load",
        NPZ,
        _npz(x=ROWS, labels=np.full(48, 0.5)),
        2,
        "not one class index per sample",
    ),
    ("negative-labels", "load", NPZ, _npz(x=ROWS, labels=np.full(48, -1)), 2, "negative"),
    ("bool-labels", "load", NPZ, _npz(x=ROWS, labels=np.ones(48, bool)), 2, "booleans"),
    ("uint16-labels", "load", NPZ, _npz(x=ROWS, labels=np.full(48, 2, "u2")), 0, "accuracy"),
    ("uint64-labels", "load", NPZ, _npz(x=ROWS, labels=np.full(48, 2**63, "u8")), 2, "negative"),
    (
        "labels-beyond-classes",
        "load",
        NPZ,
        _npz(x=ROWS, labels=np.full(48, 1000)),
        2,
        "label 1000 is out of range: the model's first output has 4 classes",
    ),
    (
        "fifo",
        "load",
        NPZ,
        lambda f: os.mkfifo(f / "data.npz"),
        2,
        "calibration file data.npz: not a regular file (a FIFO)",
    ),
    (
        "not-iterable",
        "load",
        '"model.py:not_iterable" samples 8 holdout 8',
        None,
        2,
        "model.py:not_iterable raised TypeError: 'int' object is not iterable",
    ),
    (
        "raises-midway",
        "load",
        '"model.py:midway" samples 8 holdout 8',
        None,
        2,
        "model.py:midway raised RuntimeError: disk gone",
    ),
    (
        "not-a-batch",
        "load",
        '"model.py:numbers" samples 8',
        None,
        2,
        "calibration batch 0 is a int",
    ),
    (
        "held-out-tail-batch",
        "load8",
        '"model.py:batches8" samples 32 holdout 13',
        None,
        2,
        "the model fails on a calibration batch (x [5, 16]): AssertionError: batch 8 only",
    ),
    (
        "same-rank-other-shape",
        "load",
        NPZ,
        _npz(x=np.zeros((48, 7), "f4")),
        2,
        "fails on a calibration batch (x [32, 7])",
    ),
    (
        "overflow-in-calibration",
        "overflow",
        NPZ,
        _npz(x=ROWS),
        1,
        "NaN or infinite on calibration batch 0 (finite data): first at the input of 'fc2'",
    ),
    (
        "overflow-on-held-out",
        "loud",
        NPZ,
        _npz(x=np.concatenate([ROWS[:32], ROWS[32:] * 1e10])),
        1,
        "on held-out batch 0 (finite data): first at the model's output, after its last layer",
    ),
    ("huge-finite", "load", NPZ, _npz(x=_with((3, 2), 3e38)), 0, "fidelity on 16"),
    ("big-endian", "load", NPZ, _npz(x=ROWS.astype(">f4")), 0, "fidelity on 16"),
]


@pytest.mark.parametrize(
    ("entry", "calibration", "data", "code", "fragment"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_hostile_numbers(tmp_path: Path, capsys, entry, calibration, data, code, fragment):
    (tmp_path / "model.py").write_text(MODEL)
    if data is not None:
        data(tmp_path)
    spec = tmp_path / "s.qspec"
    spec.write_text(f'qspec 1\nmodel "model.py:{entry}"\ncalibration {calibration}\n{BODY}')
    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == code
    captured = capsys.readouterr()
    output = captured.err + captured.out
    assert fragment in output
    assert not (tmp_path / "unpickled").exists()
    if code == 2:  # located at the calibration statement, with a hint for data problems
        assert f"{spec}:3:" in output
    if code == 0:
        _strict_json(tmp_path / "out" / "report.json")


def _strict_json(path: Path) -> dict:
    """The file parsed by a strict reader: a bare NaN or Infinity token fails the test."""

    def refuse(token: str):
        raise AssertionError(f"{path.name} holds a bare {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_digits_nan_names_file_array_and_index(tmp_path: Path, capsys):
    """The digits CNN example with one NaN pixel: exit 2 at its calibration line."""
    folder = tmp_path / "digits"
    shutil.copytree(Path(__file__).parents[1] / "examples" / "digits_cnn", folder)
    with np.load(folder / "digits.npz") as data:
        arrays = {name: data[name] for name in data.files}
    arrays["pixels"] = arrays["pixels"].copy()
    arrays["pixels"][3, 0, 1, 2] = np.nan
    np.savez(folder / "digits.npz", **arrays)
    spec = folder / "int4.qspec"
    line = next(
        n for n, text in enumerate(spec.read_text().splitlines(), 1) if text.startswith("calib")
    )
    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:{line}:13: error: digits.npz: array 'pixels' has NaN at [3, 0, 1, 2]" in err


def test_infinite_snr_is_strict_json_and_read_back_by_floors(tmp_path: Path, capsys):
    """Layers quantized without error have an infinite SNR: report.json writes it as "inf"
    (strict JSON), and a rebuild served from the build cache reads the report back and
    checks --fail-under on it."""
    (tmp_path / "model.py").write_text(MODEL)
    np.savez(tmp_path / "data.npz", x=ROWS)
    spec = tmp_path / "s.qspec"
    spec.write_text(f'qspec 1\nmodel "model.py:exact"\ncalibration {NPZ}\n{BODY}')
    out = tmp_path / "out"
    for floor, code in (("snr=20", 0), ("snr=20", 0), ("snr=1000", 1)):
        assert main(["compile", str(spec), "-o", str(out), "--fail-under", floor]) == code
        capsys.readouterr()
        report = _strict_json(out / "report.json")
        _strict_json(out / "manifest.json")
        assert [layer["snr_db"] for layer in report["layers"]] == ["inf", "inf"]
        assert [layer["relative_error"] for layer in report["layers"]] == [0.0, 0.0]


def test_non_finite_outputs_never_score():
    """NaN or infinity in either output: NaN cosine and SNR (never 1.0 and inf dB), and a
    NaN fails every --fail-under floor, as stored in report.json."""
    reference = [np.ones((4, 3), "f4")]
    for bad in (np.nan, np.inf):
        candidate = [np.ones((4, 3), "f4")]
        candidate[0][2, 1] = bad
        fidelity = compare(reference, candidate, [np.zeros(4, int)])
        assert np.isnan(fidelity.cosine_mean) and np.isnan(fidelity.snr_db)
        assert np.isnan(fidelity.top1_agreement)
        floors = {"cosine": 0.5, "snr": 10.0, "top1": 0.5}
        assert len(fidelity_floors_missed(fidelity.as_dict(), floors)) == 3
        stored = {k: str(v) if isinstance(v, float) else v for k, v in fidelity.as_dict().items()}
        assert len(fidelity_floors_missed(stored, floors)) == 3


def test_zero_output_scores_zero_against_a_nonzero_reference():
    reference = [np.array([[1.0, 2.0], [0.0, 0.0]], "f4")]
    fidelity = compare(reference, [np.zeros((2, 2), "f4")], None)
    assert fidelity.cosine_min == 0.0 and fidelity.cosine_mean == 0.5


def test_extreme_finite_outputs_do_not_overflow():
    reference = [np.full((2, 4), 3e38, "f4")]
    candidate = [np.full((2, 4), -3e38, "f4")]
    fidelity = compare(reference, candidate, None)
    assert fidelity.cosine_mean == -1.0
    assert np.isfinite(fidelity.snr_db) and np.isfinite(fidelity.max_abs_error)
