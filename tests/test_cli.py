"""The command line: check, fmt, exit codes, help."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qspec.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples"
MESSY = (
    'qspec 1\n# keep me\nlayer   "x"   {weight  int4   group 32 # trailing\n}\n\n\n\ntarget onnx\n'
)
TIDY = 'qspec 1\n# keep me\nlayer "x" {\n  weight int4 group 32  # trailing\n}\n\ntarget onnx\n'


def qspec(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qspec", *args], input=stdin, capture_output=True, text=True
    )


def test_check_prints_one_line_per_file(capsys):
    paths = [str(EXAMPLES / "minilm" / "mixed.qspec"), str(EXAMPLES / "minilm" / "int4.qspec")]
    assert main(["check", *paths]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{paths[0]}: ok: 1 rule, 1 target, 1 budget",
        f"{paths[1]}: ok: 1 rule, 3 targets, 0 budgets",
    ]


def test_check_reports_warnings_but_succeeds(tmp_path: Path, capsys):
    path = tmp_path / "w.qspec"
    path.write_text('qspec 1\nlayer "x" { weight int4 }\nlayer "x" { weight int8 }\n')
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert "warning: this rule has no effect" in captured.err
    assert captured.out.strip().endswith("1 warning")


def test_fmt_rewrites_in_place_and_keeps_comments(tmp_path: Path):
    path = tmp_path / "messy.qspec"
    path.write_text(MESSY)
    assert main(["fmt", str(path)]) == 0
    assert path.read_text() == TIDY
    assert main(["fmt", str(path)]) == 0  # idempotent
    assert path.read_text() == TIDY


def test_fmt_check_prints_a_diff_and_exits_1(tmp_path: Path, capsys):
    path = tmp_path / "messy.qspec"
    path.write_text(MESSY)
    assert main(["fmt", "--check", str(path)]) == 1
    diff = capsys.readouterr().out
    assert diff.startswith(f"--- {path} (current)\n+++ {path} (formatted)\n")
    assert '+layer "x" {\n' in diff
    assert path.read_text() == MESSY  # --check changes nothing


def test_fmt_stdin_to_stdout():
    run = qspec("fmt", "-", stdin=MESSY)
    assert (run.returncode, run.stdout) == (0, TIDY)


def test_fmt_refuses_a_broken_file_and_leaves_it_alone(tmp_path: Path):
    path = tmp_path / "broken.qspec"
    path.write_text('qspec 1\nlayer "x" {\n  weight int4\n')
    run = qspec("fmt", str(path))
    assert run.returncode == 2
    assert f"{path}:2:11: error: this '{{' is never closed" in run.stderr
    assert path.read_text() == 'qspec 1\nlayer "x" {\n  weight int4\n'


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*/*.qspec")), ids=lambda p: p.name)
def test_examples_are_formatted(example: Path, tmp_path: Path):
    copy = tmp_path / example.name
    shutil.copy(example, copy)
    assert main(["fmt", "--check", str(copy)]) == 0


def test_version_and_help_with_examples():
    assert qspec("--version").stdout.startswith("qspec ")
    top = qspec("--help").stdout
    assert "qspec check examples/minilm/int4.qspec" in top and "exit codes" in top
    assert "example:" in qspec("check", "--help").stdout
    assert "qspec fmt --check spec.qspec" in qspec("fmt", "--help").stdout


def test_missing_file_is_a_user_error():
    run = qspec("check", "does/not/exist.qspec")
    assert run.returncode == 2
    assert "does/not/exist.qspec: error: cannot read file: No such file or directory" in run.stderr
    assert "Traceback" not in run.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("qspec")
    example = str(EXAMPLES / "minilm" / "int8.qspec")
    run = subprocess.run([script, "check", example], text=True, capture_output=True)
    assert run.returncode == 0, run.stderr
