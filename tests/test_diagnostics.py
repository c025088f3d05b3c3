"""Exact text of the diagnostics for common mistakes.

Each `tests/errors/NAME.qspec` is checked and its rendered diagnostics must equal `NAME.txt`
character for character: messages are part of the interface people read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qspec.dsl.load import check_file

ERRORS = Path(__file__).parent / "errors"
CASES = sorted(p.stem for p in ERRORS.glob("*.qspec"))


def rendered(name: str, text: str) -> str:
    checked = check_file(name, text=text)
    return "\n".join(d.render(checked.sources) for d in checked.diagnostics) + "\n"


def test_there_are_many_distinct_mistakes():
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES)
def test_diagnostic_text(case: str):
    source = (ERRORS / f"{case}.qspec").read_text()
    assert rendered(f"{case}.qspec", source) == (ERRORS / f"{case}.txt").read_text()


def test_several_errors_in_one_run():
    text = (
        "qspec 1\n"
        'layer "a" {\n  weight int5 group 32\n}\n'
        'layer "b" {\n  weight int4 grup 32\n}\n'
        'layer "c" {\n  sparsity 2:4 by wandaa\n}\n'
    )
    checked = check_file("many.qspec", text=text)
    lines = [(d.span.line, d.message) for d in checked.errors]
    assert lines == [
        (3, "unknown weight format 'int5'"),
        (6, "unexpected word 'grup'"),
        (9, "unknown sparsity method 'wandaa'"),
    ]


def test_semantic_errors_are_all_reported():
    text = (
        "qspec 1\ntarget tvm { device cpu }\n"
        'layer "a" {\n  weight fp4 asymmetric\n  sparsity 4:2\n  compensate lora rank 0\n}\n'
    )
    messages = [d.message for d in check_file("s.qspec", text=text).errors]
    assert messages == [
        "tvm cannot compile for device 'cpu'",
        "fp4_e2m1 has a fixed symmetric grid and no zero point",
        "4:2 sparsity is impossible",
        "rank must be positive",
    ]


def test_include_cycle(tmp_path: Path):
    (tmp_path / "a.qspec").write_text('qspec 1\ninclude "b.qspec"\n')
    (tmp_path / "b.qspec").write_text('qspec 1\ninclude "a.qspec"\n')
    checked = check_file(tmp_path / "a.qspec")
    (error,) = checked.errors
    a, b = tmp_path / "a.qspec", tmp_path / "b.qspec"
    assert error.message == f"include cycle: {a} -> {b} -> {a}"
    assert (error.span.file, error.span.line, error.span.column) == (str(b), 2, 9)


def test_errors_in_included_file_point_into_it(tmp_path: Path):
    (tmp_path / "base.qspec").write_text('qspec 1\nlayer "x" {\n  weight int9\n}\n')
    (tmp_path / "main.qspec").write_text('qspec 1\ninclude "base.qspec"\n')
    (error,) = check_file(tmp_path / "main.qspec").errors
    assert str(error.span) == f"{tmp_path / 'base.qspec'}:3:10"


def test_random_bytes_are_located(tmp_path: Path):
    path = tmp_path / "noise.qspec"
    path.write_bytes(b"qspec 1\nmodel \xff\xfe\x00garbage")
    (error,) = check_file(path).errors
    assert str(error.span) == f"{path}:2:7"
    assert error.message == "not a text file: byte 0xff is not UTF-8"


def test_cli_exit_code_and_no_traceback(tmp_path: Path):
    path = tmp_path / "bad.qspec"
    path.write_text((ERRORS / "option.qspec").read_text())
    run = subprocess.run(
        [sys.executable, "-m", "qspec", "check", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert f"{path}:3:15: error: unexpected word 'grup'" in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == f"{path}: 1 error\n"
