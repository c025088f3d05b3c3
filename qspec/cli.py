"""The `qspec` command line. `check` and `fmt` read text only: they never import user code."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from qspec import __version__
from qspec.dsl.diagnostics import Diagnostic
from qspec.dsl.format import format_text
from qspec.dsl.load import check_file, read_source

OK, CHANGED, USER_ERROR, INTERNAL_ERROR = 0, 1, 2, 3

EXAMPLES = """\
examples:
  qspec check examples/minilm/int4.qspec      parse and validate, one line per file
  qspec fmt examples/*.qspec                  rewrite files in canonical form
  qspec fmt --check spec.qspec                exit 1 and print a diff if it would change
  cat spec.qspec | qspec fmt -                format standard input to standard output

exit codes: 0 success, 1 fmt --check found changes, 2 error in a spec, 3 internal error
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USER_ERROR
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("qspec: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug in qspec: say so briefly unless asked for details
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"qspec: internal error: {type(error).__name__}: {error}\n"
                "  (run with --debug for the traceback, and please report it)",
                file=sys.stderr,
            )
        return INTERNAL_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qspec",
        description="Compile PyTorch models to low-bit ONNX Runtime and TVM artifacts "
        "from declarative .qspec files.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qspec {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="parse and validate specs",
        description="Parse and validate .qspec files (and what they include) without "
        "running any model code.",
        epilog="example:\n  qspec check examples/minilm/int4.qspec examples/*.qspec",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(command="check", run=run_check)

    fmt = commands.add_parser(
        "fmt",
        help="format specs in canonical form",
        description="Rewrite .qspec files in canonical form, keeping comments. "
        "'-' formats standard input to standard output.",
        epilog="examples:\n  qspec fmt examples/minilm/*.qspec\n  qspec fmt --check spec.qspec\n"
        "  qspec fmt - < spec.qspec",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt.add_argument("files", nargs="+", metavar="FILE")
    fmt.add_argument(
        "--check", action="store_true", help="change nothing; print a diff and exit 1 if needed"
    )
    fmt.set_defaults(command="fmt", run=run_fmt)
    return parser


def _report(diagnostics: list[Diagnostic], sources: dict[str, str]) -> None:
    for diagnostic in diagnostics:
        print(diagnostic.render(sources), file=sys.stderr)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def run_check(args: argparse.Namespace) -> int:
    status = OK
    for path in args.files:
        checked = check_file(path)
        _report(checked.diagnostics, checked.sources)
        if checked.errors or checked.spec is None:
            print(f"{path}: {_plural(len(checked.errors), 'error')}")
            status = USER_ERROR
            continue
        spec = checked.spec
        warnings = len(checked.diagnostics)
        print(
            f"{path}: ok: {_plural(len(spec.rules), 'rule')}, "
            f"{_plural(len(spec.targets), 'target')}, {_plural(len(spec.limits), 'budget')}"
            + (f", {_plural(warnings, 'warning')}" if warnings else "")
        )
    return status


def run_fmt(args: argparse.Namespace) -> int:
    status = OK
    for path in args.files:
        if path == "-":
            text, name = sys.stdin.read(), "<stdin>"
        else:
            source, problem = read_source(path)
            if problem:
                _report([problem], {})
                status = USER_ERROR
                continue
            assert source is not None
            text, name = source, path
        formatted, diagnostics = format_text(text, name)
        if formatted is None:
            _report(diagnostics, {name: text})
            status = USER_ERROR
            continue
        if args.check:
            if formatted != text:
                sys.stdout.writelines(
                    difflib.unified_diff(
                        text.splitlines(keepends=True),
                        formatted.splitlines(keepends=True),
                        f"{name} (current)",
                        f"{name} (formatted)",
                    )
                )
                status = max(status, CHANGED)
        elif path == "-":
            sys.stdout.write(formatted)
        elif formatted != text:
            _write_atomically(Path(path), formatted)
            print(f"formatted {path}", file=sys.stderr)
    return status


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step, so an interrupted write leaves the old file intact."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
