"""Mutation fuzzing of the bundled examples.

Every example is mutated at random (characters deleted, keywords, punctuation and junk inserted,
lines swapped, duplicated, the file truncated) with a seeded generator, and checked in-process
and through the command line. Whatever the input, `check_file` must return diagnostics (never
raise, never hang) that point into the file and render, and `qspec check` must exit 0 or 2 with
a located message, never a traceback. Mutants that still parse must also format stably: same IR,
idempotent, every comment kept.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qspec.dsl import ir
from qspec.dsl.format import format_document, format_text
from qspec.dsl.load import Checked, check_file
from qspec.dsl.parser import normalize, parse_document

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.qspec"))
MUTANTS_PER_FILE = 100
SLOW = 5.0  # seconds: a generous bound, to catch hangs and blow-ups, not to benchmark
HANG = 30  # seconds: give up on a call altogether (so that a hang fails instead of stalling)

# Pieces of the language and of typical mistakes, inserted at random positions.
TOKENS = [
    "{", "}", "[", "]", ",", ":", "%", '"', "#", 're"', "2:4", "int4", "weight", "layer",
    "keep", "choose", "qspec", "qspec 1\n", "include", 'include "common.qspec"\n',
    'include "int4.qspec"\n', "defaults", "budget", "target", "model", "calibration", "tie",
    "allocate", "sparsity", "activation", "compensate", "lora", "rank", "group", "round",
    "search", "by", "none", "<=", "=", "-", "-1", "0", "0.5", "50%", "1e9", "1e999",
    "99999999999999999999999", "3.", ".5", "fp8", "fp4", "nf4", "int9", "e8m0", "\\", '\\"',
    "\n", " ", "\t", "\r", "\r\n", "\x00", "\x0c", "\x7f", "\ufeff", "\u2028", "é", "∗", "🙂",
    '"unterminated', 'layer "x" {', "layer re\"(\" { keep }\n", "}\n}\n", "{{{{{{{{",
    "[[[[", '"' * 7, "#" * 3,
]  # fmt: skip


def _random_chars(rng: random.Random) -> str:
    size = rng.randint(1, 8)
    kind = rng.random()
    if kind < 0.4:
        return "".join(chr(rng.randint(0x20, 0x7E)) for _ in range(size))
    if kind < 0.7:  # what random bytes look like once read as Latin-1
        return bytes(rng.randrange(256) for _ in range(size)).decode("latin-1")
    # any code point except lone surrogates (a file read as UTF-8 never holds them)
    return "".join(
        chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
        for _ in range(size)
    )


def _delete(rng: random.Random, text: str) -> str:
    if not text:
        return text
    start = rng.randrange(len(text))
    return text[:start] + text[start + rng.randint(1, 24) :]


def _insert(rng: random.Random, text: str) -> str:
    at = rng.randint(0, len(text))
    piece = rng.choice(TOKENS) if rng.random() < 0.7 else _random_chars(rng)
    if rng.random() < 0.5:
        piece = " " + piece + " "
    return text[:at] + piece + text[at:]


def _replace(rng: random.Random, text: str) -> str:
    if not text:
        return text
    at = rng.randrange(len(text))
    return text[:at] + rng.choice(TOKENS) + text[at + 1 :]


def _swap_lines(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def _duplicate_line(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    lines.insert(rng.randint(0, len(lines)), lines[i])
    return "\n".join(lines)


def _truncate(rng: random.Random, text: str) -> str:
    return text[: rng.randint(0, len(text))]


NUMBER = re.compile(r"\b[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\b")
EXTREME_NUMBERS = [
    "0", "00", "007", "1.0", "1.5", "0.0001", "1e3", "1e-3", "1E+2", "1e999", "1e-999",
    "1e308", "2e308", "99999999999999999999999", "9007199254740993", "-1", "1.", ".5",
    "0x10", "1_000", "NaN", "inf",
]  # fmt: skip
WORD = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def _replace_number(rng: random.Random, text: str) -> str:
    """A number written where a number goes, but an extreme or malformed one."""
    found = list(NUMBER.finditer(text))
    if not found:
        return _insert(rng, text)
    match = rng.choice(found)
    return text[: match.start()] + rng.choice(EXTREME_NUMBERS) + text[match.end() :]


def _replace_word(rng: random.Random, text: str) -> str:
    """A word replaced by another word of the language (or a misspelling of one)."""
    found = list(WORD.finditer(text))
    if not found:
        return _insert(rng, text)
    match = rng.choice(found)
    word = rng.choice([t for t in TOKENS if t.isidentifier()] + [m.group() for m in found])
    if rng.random() < 0.3:
        at = rng.randrange(len(word))
        word = word[:at] + word[at + 1 :] or "x"
    return text[: match.start()] + word + text[match.end() :]


MUTATIONS: list[Callable[[random.Random, str], str]] = [
    _delete,
    _delete,
    _insert,
    _insert,
    _insert,
    _replace,
    _swap_lines,
    _duplicate_line,
    _truncate,
    _replace_number,
    _replace_number,
    _replace_word,
]


def mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 5])):
        text = rng.choice(MUTATIONS)(rng, text)
    return text


def mutants(path: Path, count: int = MUTANTS_PER_FILE) -> Iterator[str]:
    rng = random.Random(f"qspec-fuzz:{path.parent.name}/{path.name}")
    text = path.read_text()
    for _ in range(count):
        yield mutate(rng, text)


# ---- in-process checks -------------------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after `seconds` (a hang must fail the test, not stall it)."""
    main_thread = threading.current_thread() is threading.main_thread()
    if not (hasattr(signal, "setitimer") and main_thread):
        yield
        return

    def expire(signum, frame):
        raise Hang(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def problems_with_check(path: Path, text: str) -> list[str]:
    """What is wrong with checking `text` as the file at `path` (empty when all is well)."""
    start = time.perf_counter()
    try:
        with time_limit(HANG):
            checked = check_file(path, text=text)
    except Hang as hang:
        return [f"check_file hangs: {hang}"]
    except BaseException as error:
        return [f"check_file raised {type(error).__name__}: {error}"]
    elapsed = time.perf_counter() - start

    problems = []
    if elapsed > SLOW:
        problems.append(f"check_file took {elapsed:.1f} s")
    if not isinstance(checked, Checked):
        return [*problems, f"check_file returned {type(checked).__name__}"]
    if not checked.errors and checked.spec is None:
        problems.append("no errors and no spec")

    name = os.fspath(path)
    last_line = normalize(text).count("\n") + 1  # CR and CRLF end lines too
    for diagnostic in checked.diagnostics:
        try:
            rendered = diagnostic.render(checked.sources)
        except BaseException as error:
            problems.append(f"rendering {diagnostic} raised {type(error).__name__}: {error}")
            continue
        if not rendered.startswith(f"{diagnostic.span}: {diagnostic.severity}: "):
            problems.append(f"rendering does not start with the location: {rendered!r}")
        if diagnostic.severity != "error" or not text:
            continue
        span = diagnostic.span
        if span.line < 1 or span.column < 1:
            problems.append(f"error without a line and column: {rendered}")
        elif span.file == name and span.line > last_line:
            problems.append(f"error beyond the end of the file ({last_line} lines): {rendered}")
    return problems


def _report(failures: list[tuple[str, list[str]]]) -> str:
    shown = [f"--- input {text!r}\n" + "\n".join(problems) for text, problems in failures[:5]]
    return f"{len(failures)} failing input(s); the first ones:\n" + "\n".join(shown)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_check_never_raises_on_mutants(example: Path):
    failures = []
    for text in mutants(example):
        problems = problems_with_check(example, text)
        if problems:
            failures.append((text, problems))
    assert not failures, _report(failures)


def test_check_never_raises_on_junk():
    rng = random.Random("qspec-fuzz:junk")
    example = EXAMPLES[0]
    inputs = ["", " ", "\n", "\n\n\n", "#", "qspec", "qspec 1", "\ufeffqspec 1\n", "\x00" * 64]
    inputs += ["".join(_random_chars(rng) for _ in range(rng.randint(1, 40))) for _ in range(30)]
    inputs += ["".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 40))) for _ in range(30)]
    # big inputs: deep nesting, thousands of broken statements, a long file
    inputs += ["{" * 5000, "}" * 5000, '"' * 5000, "layer " * 5000, 'qspec 1\nlayer "x" {\n' * 1000]
    inputs += ["qspec 1\n" + "target onnx { device gpu }\n" * 1000, example.read_text() * 40]
    failures = []
    for text in inputs:
        problems = problems_with_check(example, text)
        if problems:
            failures.append((text, problems))
    assert not failures, _report(failures)


def test_examples_are_clean():
    """The fuzzing starts from valid files (else a mutant's errors prove little)."""
    for example in EXAMPLES:
        checked = check_file(example)
        assert not checked.errors, "\n".join(d.render(checked.sources) for d in checked.errors)
    assert len(EXAMPLES) >= 2


def _parsed(text: str) -> ir.Document | None:
    """The document, or None when the text does not parse (a parser crash is another test's
    finding: test_check_never_raises_on_mutants)."""
    try:
        document, diagnostics = parse_document(text, "mutant.qspec")
    except Exception:
        return None
    if document is None or any(d.severity == "error" for d in diagnostics):
        return None
    return document


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_mutants_that_parse_format_stably(example: Path):
    """A mutant that still parses (lines swapped or duplicated, comments cut, junk in comments)
    formats to text with the same IR, and formatting that text changes nothing."""
    failures = []
    for text in mutants(example):
        document = _parsed(text)
        if document is None:
            continue
        try:
            formatted, _ = format_text(text, "mutant.qspec")
        except BaseException as error:
            failures.append((text, [f"format_text raised {type(error).__name__}: {error}"]))
            continue
        problems = []
        again = _parsed(formatted) if formatted is not None else None
        if again is None:
            problems.append(f"the formatted text does not parse:\n{formatted}")
        elif again != document:
            problems.append(f"formatting changed the IR:\n{formatted}")
        elif format_document(again) != formatted:
            problems.append(f"formatting is not idempotent:\n{formatted}")
        elif sorted(c.text.rstrip() for c in again.comments) != sorted(
            c.text.rstrip() for c in document.comments
        ):
            problems.append(f"comments lost or doubled:\n{formatted}")
        if problems:
            failures.append((text, problems))
    assert not failures, _report(failures)


# ---- the command line --------------------------------------------------------------------------

QSPEC = Path(sys.executable).with_name("qspec")
LOCATION = re.compile(r":\d+:\d+: ")


def run_check(path: Path | str) -> subprocess.CompletedProcess[str]:
    command = [str(QSPEC)] if QSPEC.exists() else [sys.executable, "-m", "qspec"]
    return subprocess.run(
        [*command, "check", str(path)], capture_output=True, text=True, timeout=60
    )


def assert_clean_exit(result: subprocess.CompletedProcess[str], located: bool) -> None:
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode in (0, 2), shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    assert "internal error" not in result.stderr, shown
    if result.returncode == 2:
        assert result.stderr.strip(), shown
        if located:
            assert LOCATION.search(result.stderr), shown


def test_cli_on_mutated_files(tmp_path: Path):
    """Mutants written next to copies of the files they include, checked by `qspec check`."""
    rng = random.Random("qspec-fuzz:cli")
    for example in EXAMPLES:
        folder = tmp_path / example.parent.name
        if not folder.exists():
            folder.mkdir()
            for sibling in example.parent.glob("*.qspec"):
                shutil.copy(sibling, folder / sibling.name)
    picked = rng.sample(EXAMPLES, k=min(6, len(EXAMPLES)))
    for number, example in enumerate(picked):
        path = tmp_path / example.parent.name / f"mutant{number}.qspec"
        path.write_text(mutate(rng, example.read_text()), encoding="utf-8")
        assert_clean_exit(run_check(path), located=True)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.qspec", b""),
        ("random.qspec", random.Random("qspec-fuzz:bytes").randbytes(512)),
        ("binary.qspec", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4),
        ("nul.qspec", b"qspec 1\n\x00\x00\x00\nlayer \x00 { keep }\n"),
        ("bom.qspec", b'\xef\xbb\xbfqspec 1\nlayer "x" { keep }\n'),
        ("latin1.qspec", 'qspec 1\nlayer "caf\xe9" { keep }\n'.encode("latin-1")),
        ("huge_number.qspec", b'qspec 1\ncalibration "d.npz" samples 1e999\n'),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_cli_on_junk_files(tmp_path: Path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    assert_clean_exit(run_check(path), located=True)


def test_cli_on_a_directory_and_a_missing_path(tmp_path: Path):
    for path in (tmp_path, tmp_path / "missing.qspec"):
        result = run_check(path)
        assert result.returncode == 2, result.stderr
        assert_clean_exit(result, located=False)
        assert str(path) in result.stderr
