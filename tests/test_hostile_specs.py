"""Hostile and broken spec files, includes and arguments: never a hang, a crash (exit 3) or a
false pass. Each user mistake is exit 2 with a message (located where it is about a spec)."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from projects import TINY_MODEL, write_project

from qspec.cli import main
from qspec.dsl.files import NotRegularFile, read_regular, regular_file_problem
from qspec.dsl.ir import Pattern, Span
from qspec.dsl.patterns import PatternError, check_pattern, matches

ROOT = Path(__file__).resolve().parents[1]
QSPEC = [sys.executable, "-m", "qspec"]
OK_SPEC = 'qspec 1\nlayer "x" { keep }\n'


def qspec(*args: str, timeout: float = 30, stdin: bytes | None = None):
    """The command line in a child process: a hang fails the test instead of stalling it."""
    return subprocess.run(
        [*QSPEC, *args], capture_output=True, timeout=timeout, input=stdin, cwd=ROOT
    )


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---- spec text: (name, bytes of the file, exit code of `check`, a fragment of the output) ------

NINES = b"9" * 5000
NESTED = b"(" * 500 + b"a" + b")" * 500
SPECS = [
    ("bom", b"\xef\xbb\xbf" + OK_SPEC.encode(), 0, "ok: 1 rule"),
    ("crlf", OK_SPEC.replace("\n", "\r\n").encode(), 0, "ok: 1 rule"),
    ("lone cr", b'qspec 1\r# a comment\rlayer "x" { keep }\r', 0, "ok: 1 rule"),
    ("lone cr error", b"qspec 1\r# c\rlayer x\r", 2, ":3:7: error"),
    ("empty", b"", 2, "1:1: error"),
    ("nul bytes", b"\x00" * 100, 2, ":1:1: error"),
    ("binary", bytes(range(256)) * 8, 2, "not UTF-8"),
    ("huge int", b'qspec 1\nlayer "x" { weight int4 group ' + NINES + b" }\n", 2, "too large"),
    ("huge float", b'qspec 1\ncalibration "d.npz" samples 1e999\n', 2, "error"),
    ("deep braces", b'qspec 1\nlayer "x" ' + b"{" * 100_000 + b"\n", 2, ":2:12: error"),
    ("long line", b'qspec 1\nlayer "' + b"x" * 1_000_000 + b'" { keap }\n', 2, "unexpected"),
    ("unicode", 'qspec 1\nlayer "😀.∗" { keep }\n'.encode(), 0, "ok: 1 rule"),
    ("catastrophic regex", b'qspec 1\nlayer re"(a+)+$" { keep }\n', 2, ":2:10: error: this regex"),
    ("nested star", b'qspec 1\nlayer re"(.*\\.)*fc" { keep }\n', 2, "exponential time"),
    ("nested regex groups", b'qspec 1\nlayer re"' + NESTED + b'" { keep }\n', 2, "too deeply"),
    ("delimited repeat", b'qspec 1\nlayer re"layers(\\.\\d+)*\\.fc" { keep }\n', 0, "ok: 1 rule"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "code", "fragment"), SPECS, ids=[s[0] for s in SPECS])
def test_check_on_hostile_text(tmp_path: Path, capsys, name, content, code, fragment):
    path = tmp_path / "spec.qspec"
    path.write_bytes(content)
    start = time.perf_counter()
    got, output = run_main(capsys, "check", str(path))
    assert (got, fragment in output) == (code, True), output[-2000:]
    assert time.perf_counter() - start < 10
    assert len(output) < 5000, "a diagnostic shows a window of a long line, not all of it"


def test_fmt_accepts_bom_and_cr_and_writes_canonical_text(tmp_path: Path, capsys):
    path = tmp_path / "spec.qspec"
    path.write_bytes(b'\xef\xbb\xbfqspec 1\r# note\rlayer "x"   { keep }\r')
    assert run_main(capsys, "fmt", "--check", str(path))[0] == 1
    assert run_main(capsys, "fmt", str(path))[0] == 0
    assert path.read_bytes() == b'qspec 1\n# note\nlayer "x" {\n  keep\n}\n'


# ---- things that are not regular files ---------------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.qspec"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("command", [["check"], ["fmt"], ["fmt", "--check"]])
def test_a_fifo_is_refused_without_blocking(fifo: Path, command: list[str]):
    result = qspec(*command, str(fifo), timeout=20)
    assert result.returncode == 2, result.stderr
    assert b"not a regular file (a FIFO)" in result.stderr


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_a_device_is_refused(capsys, path: str):
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    code, output = run_main(capsys, "check", path)
    assert code == 2 and "not a regular file (a character device)" in output, output


def test_a_directory_is_refused(tmp_path: Path, capsys):
    code, output = run_main(capsys, "check", str(tmp_path))
    assert code == 2 and "not a regular file (a directory)" in output, output


def test_an_included_fifo_is_refused_where_it_is_included(tmp_path: Path, fifo: Path):
    spec = tmp_path / "main.qspec"
    spec.write_text(f'qspec 1\ninclude "{fifo.name}"\n')
    result = qspec("check", str(spec), timeout=20)
    assert result.returncode == 2
    assert b"main.qspec:2:9: error: cannot read included file: not a regular file" in result.stderr


@pytest.mark.parametrize("target", ["/proc/self/environ", "secrets.txt"])
def test_only_specs_are_included(tmp_path: Path, capsys, monkeypatch, target: str):
    """A spec is data a CI job may check from a pull request: including any other file would
    echo its first line (an environment variable, a password hash) in the diagnostic."""
    monkeypatch.setenv("QSPEC_TEST_SECRET", "hunter2")
    (tmp_path / "secrets.txt").write_text("password=hunter2\n")
    spec = tmp_path / "main.qspec"
    spec.write_text(f'qspec 1\ninclude "{target}"\n')
    code, output = run_main(capsys, "check", str(spec))
    assert code == 2 and "is not a .qspec file" in output and "hunter2" not in output, output


def test_an_include_chain_too_deep_is_located(tmp_path: Path, capsys):
    for i in range(500):
        (tmp_path / f"f{i}.qspec").write_text(f'qspec 1\ninclude "f{i + 1}.qspec"\n')
    (tmp_path / "f500.qspec").write_text(OK_SPEC)
    code, output = run_main(capsys, "check", str(tmp_path / "f0.qspec"))
    assert code == 2 and "f63.qspec:2:9: error: includes nest more than 64" in output, output


def test_shared_file_helpers(tmp_path: Path, fifo: Path):
    """For other readers of user-named files (calibration data): same checks, same words."""
    regular = tmp_path / "data.bin"
    regular.write_bytes(b"12345")
    assert regular_file_problem(regular) is None
    assert regular_file_problem(fifo) == "not a regular file (a FIFO)"
    assert regular_file_problem(tmp_path / "missing") == "No such file or directory"
    assert read_regular(regular, 5) == b"12345"
    with pytest.raises(NotRegularFile, match="larger than"):
        read_regular(regular, 4)
    with pytest.raises(NotRegularFile, match="a FIFO"):
        read_regular(fifo, 100)


# ---- layer patterns ----------------------------------------------------------------------------

SAFE = [
    r"layers\.\d+\.(q|k|v)_proj",
    r"(\.\d+)*",
    r"(ab|a)*c",
    r"(foo|bar)*",
    r"(?>a+)+",
    r"(a*+)*",
]
UNSAFE = [
    r"(a+)+$",
    r"(.*\.)*x",
    r"(\w+)*x",
    r"(a*)*",
    r"(x+x+)+y",
    r"((a|b)+)+",
    r"(\d+|x)*",
    r"(a|a)*",  # alternatives alike: the shared prefix is factored out, leaving two empties
    r"(a?){25}a{25}",  # a round that can be empty
]


@pytest.mark.parametrize("text", SAFE)
def test_safe_regexes_are_accepted_and_fast(text: str):
    pattern = Pattern(text, True, Span("t", 1, 1, 1, 1))
    check_pattern(pattern)
    start = time.perf_counter()
    matches(pattern, "a" * 5000 + "!")
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("text", UNSAFE)
def test_regexes_that_backtrack_exponentially_are_refused(text: str):
    with pytest.raises(PatternError, match="exponential time"):
        check_pattern(Pattern(text, True, Span("t", 1, 1, 1, 1)))


def test_polynomial_regexes_finish_on_long_names():
    """Shapes the static check lets through (`a*a*...a*!`) run on the regex engine under a
    time limit: on a 64-character name they finish instead of hanging a compile."""
    name = "a" * 64
    start = time.perf_counter()
    for text in (r"a*a*a*a*a*a*a*a*a*a*!", r".*.*.*.*.*.*.*.*.*.*.*x", r"\w*\w*\w*\w*\w*\w*!"):
        assert not matches(Pattern(text, True, Span("t", 1, 1, 1, 1)), name)
    assert time.perf_counter() - start < 10


def test_a_regex_that_runs_out_of_time_is_a_located_error(monkeypatch):
    from qspec.dsl import patterns

    class Slow:
        def fullmatch(self, name: str, timeout: float):
            raise TimeoutError

    monkeypatch.setattr(patterns, "_timed", lambda text: Slow())
    with pytest.raises(PatternError, match="took more than 1 s on the layer name 'fc1'"):
        matches(Pattern("fc.*", True, Span("t", 1, 1, 1, 1)), "fc1")


def test_a_repeat_count_beyond_the_engine_is_a_spec_error():
    with pytest.raises(PatternError, match="repeat count in the regex is too large"):
        check_pattern(Pattern("a{99999999999}", True, Span("t", 1, 1, 1, 1)))


# ---- fmt writes through links, keeps the inode, and goes on past a file it cannot write ---------


def test_fmt_writes_through_a_symlink_and_keeps_inode_and_mode(tmp_path: Path, capsys):
    target = tmp_path / "real.qspec"
    target.write_text('qspec 1\nlayer "x"   { keep }\n')
    target.chmod(0o640)
    link, hard = tmp_path / "link.qspec", tmp_path / "hard.qspec"
    link.symlink_to(target.name)
    os.link(target, hard)
    before = target.stat()
    assert run_main(capsys, "fmt", str(link))[0] == 0
    assert link.is_symlink()
    after = target.stat()
    assert (after.st_ino, after.st_uid, stat.S_IMODE(after.st_mode)) == (
        before.st_ino,
        before.st_uid,
        0o640,
    )
    assert hard.read_text() == 'qspec 1\nlayer "x" {\n  keep\n}\n'


def test_fmt_goes_on_after_a_file_it_cannot_write(tmp_path: Path, capsys, monkeypatch):
    first, second = tmp_path / "a.qspec", tmp_path / "b.qspec"
    for path in (first, second):
        path.write_text('qspec 1\nlayer "x"   { keep }\n')
    real_open = os.open

    def refuse_first(path, flags, *args, **kwargs):
        if Path(path) == first and flags & os.O_WRONLY:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_first)
    code, output = run_main(capsys, "fmt", str(first), str(second))
    assert code == 2
    assert f"{first}: error: cannot write file: Permission denied" in output
    assert second.read_text().endswith("{\n  keep\n}\n")
    assert first.read_text() == 'qspec 1\nlayer "x"   { keep }\n'


def test_fmt_of_bad_utf8_on_stdin_is_located():
    result = qspec("fmt", "-", stdin=b"qspec 1\n\xff\n")
    assert result.returncode == 2
    assert b"<stdin>:2:1: error: not a text file" in result.stderr


# ---- arguments, refused before the spec is even read -------------------------------------------

ARGUMENTS = [
    (["--fail-under", "cosin=0.5"], "did you mean 'cosine'?"),
    (["--fail-under", "cosine=nan"], "from -1 to 1"),
    (["--fail-under", "cosine=high"], "'high' is not a number"),
    (["--fail-under", "top1=1.5"], "from 0 to 1"),
    (["--fail-under", "snr=inf"], "a finite number"),
    (["--fail-under", "cosine"], "expects METRIC=VALUE"),
    (["--fail-under", "cosine=0.9", "--fail-under", "cosine=0.8"], "given twice"),
]


@pytest.mark.parametrize(("extra", "fragment"), ARGUMENTS, ids=[a[1] for a in ARGUMENTS])
def test_compile_arguments_are_checked_first(tmp_path: Path, capsys, extra, fragment):
    missing = tmp_path / "missing.qspec"  # never read: the arguments fail first
    code, output = run_main(capsys, "compile", str(missing), "-o", str(tmp_path / "o"), *extra)
    assert code == 2 and fragment in output, output
    assert "missing.qspec" not in output


BUDGETS = [
    ("weight bits=1..1000000000 step 1", "a sweep has at most 200"),
    ("weight bits=1..1e999 step 1", "LOW <= HIGH and STEP > 0"),
    ("weight bits=3..6 step 0", "LOW <= HIGH and STEP > 0"),
    ("weight bits=40", "cannot exceed 32"),
    ("size=" + ",".join(["1"] * 300) + " MB", "at most 200"),
    ("size=1,1e999 MB", "positive and finite"),
    ("bits=4", "is not a budget"),
]


@pytest.mark.parametrize(("budget", "fragment"), BUDGETS, ids=[b[1] for b in BUDGETS])
def test_sweep_ranges_are_checked_first(tmp_path: Path, capsys, budget, fragment):
    missing = tmp_path / "missing.qspec"
    code, output = run_main(
        capsys, "sweep", str(missing), "--budget", budget, "-o", str(tmp_path / "o")
    )
    assert code == 2 and fragment in output, output


# ---- compiles of the tiny model ----------------------------------------------------------------


def test_weight_choose_without_gptq_under_output_sensitivity(tmp_path: Path, capsys):
    """The embedding has no XᵀX (its input is indices): its output error is measured as a
    lookup of equally likely rows, so the plain mixed-precision spec compiles."""
    body = "target onnx { device cpu }\ndefaults { weight choose [int4, int8] }\n"
    spec = write_project(tmp_path, TINY_MODEL, body + "budget { weight bits <= 6 }\n")
    code, output = run_main(capsys, "compile", str(spec), "-o", str(tmp_path / "out"))
    assert code == 0, output


def test_a_rank_above_what_a_layer_can_use_is_clipped_and_recorded(tmp_path: Path, capsys):
    body = (
        'target onnx { device cpu }\nlayer "fc*" { weight int8 compensate lora rank 1000000000 }\n'
    )
    spec = write_project(tmp_path, TINY_MODEL, body)
    code, output = run_main(capsys, "compile", str(spec), "-o", str(tmp_path / "out"))
    assert code == 0, output
    assert "tiny.qspec:5:48: warning: rank 1000000000 is more than 2 layers can use" in output
    import json

    layers = json.loads((tmp_path / "out" / "manifest.json").read_text())["layers"]
    ranks = {entry["name"]: entry["rank"] for entry in layers if entry.get("rank")}
    assert ranks == {"fc1": 32, "fc2": 8}
    assert all(entry["weight_bits"] <= 32 for entry in layers)


# ---- fuzz: mutated and hostile specs through the command line, in a child, time-limited ---------

PIECES = [
    "{", "}", "[", "]", '"', 're"', "(", ")", "+", "*", "\\", "\r", "\r\n", "\ufeff", "\x00",
    "9" * 60, "1e999", "layer", "weight", "choose", "rank", "include", "keep", "\u2028", "#",
]  # fmt: skip


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(PIECES)), max_size=6))
def test_fuzz_check_and_fmt_check_exit_cleanly(tmp_path: Path, edits):
    base = (ROOT / "examples" / "digits_cnn").glob("*.qspec")
    source = next(iter(sorted(base))).read_text()
    for at, piece in edits:
        at %= len(source) + 1
        source = source[:at] + piece + source[at:]
    path = tmp_path / "fuzz.qspec"
    path.write_text(source, encoding="utf-8")
    for command in (["check"], ["fmt", "--check"]):
        result = qspec(*command, str(path), timeout=20)
        output = result.stdout + result.stderr
        assert result.returncode in (0, 1, 2), output
        assert b"internal error" not in output and b"Traceback" not in output, output


def test_fuzz_random_bytes_exit_cleanly(tmp_path: Path):
    rng = random.Random("hostile")
    paths = []
    for number in range(4):
        path = tmp_path / f"junk{number}.qspec"
        path.write_bytes(b"qspec 1\n" + rng.randbytes(rng.randint(1, 4000)))
        paths.append(str(path))
    result = qspec("check", *paths, timeout=20)
    assert result.returncode == 2
    assert b"internal error" not in result.stderr and b"Traceback" not in result.stderr


def test_a_bad_source_date_epoch_is_refused_up_front(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    spec = write_project(tmp_path / "p", TINY_MODEL, 'layer "fc1" {\n  weight int8\n}\n')
    code, output = run_main(capsys, "compile", str(spec), "-o", str(tmp_path / "out"))
    assert code == 2 and "SOURCE_DATE_EPOCH='yesterday' is not a whole number" in output


def test_a_path_the_system_refuses_is_a_user_error(tmp_path: Path, capsys):
    spec = write_project(tmp_path / "p", TINY_MODEL, 'layer "fc1" {\n  weight int8\n}\n')
    code, output = run_main(capsys, "compile", str(spec), "-o", str(tmp_path / ("M" * 300)))
    assert code == 2 and "File name too long" in output and "internal error" not in output


def test_a_build_failure_is_one_line_without_colors():
    from qspec.cli import _brief

    pages = "\x1b[96mExport failed\x1b[0m: bad output\n\nDetails\n" + "more\n" * 50
    assert _brief(pages, debug=False) == (
        "Export failed: bad output ... (run with --debug for the whole message)"
    )
    assert "more" in _brief(pages, debug=True)


def test_a_top1_floor_without_labels_is_a_user_error(tmp_path: Path, capsys):
    spec = write_project(tmp_path / "p", TINY_MODEL, 'layer "fc1" {\n  weight int8\n}\n')
    out = tmp_path / "out"
    argv = ["compile", str(spec), "-o", str(out), "--fail-under", "top1=0.5"]
    code, output = run_main(capsys, *argv)
    assert code == 2 and "--fail-under top1 needs labels" in output and f"{spec}:3:" in output
    assert not out.exists()
