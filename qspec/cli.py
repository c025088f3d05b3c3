"""The `qspec` command line. `check` and `fmt` read text only: they never import user code."""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import math
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from qspec import __version__
from qspec.compiler.cache import cache_settings
from qspec.compiler.errors import CompileFailure, UserError
from qspec.dsl.diagnostics import Diagnostic, SpecError, did_you_mean
from qspec.dsl.files import NotRegularFile, numpy_load_error
from qspec.dsl.format import format_text
from qspec.dsl.ir import Span
from qspec.dsl.load import MAX_SPEC_BYTES, check_file, decode_source, read_source
from qspec.dsl.parser import normalize

OK, CHANGED, USER_ERROR, INTERNAL_ERROR = 0, 1, 2, 3

EXAMPLES = """\
examples:
  qspec compile examples/minilm/int4.qspec -o build/int4     compile, verify, write the folder
  qspec run build/int4 --input in.npz --output out.npz       run an artifact on arrays
  qspec explain examples/minilm/int4.qspec    which rule decided what, per layer
  qspec sweep examples/minilm/mixed.qspec --budget "weight bits=3..6 step 0.5" -o build/sweep
  qspec check examples/minilm/int4.qspec      parse and validate, one line per file
  qspec fmt examples/*.qspec                  rewrite files in canonical form
  qspec fmt --check spec.qspec                exit 1 and print a diff if it would change
  cat spec.qspec | qspec fmt -                format standard input to standard output

exit codes: 0 success (compile --check: up to date), 1 build failed (compile --check: out of
            date; fmt --check: would change), 2 error in the spec, model, data, options or
            output folder, 3 internal error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)
"""
TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that staging folders are cleaned up."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def run() -> None:
    """The `qspec` program: once main() has its exit code, a late Ctrl-C or SIGTERM (during
    interpreter shutdown) must not replace it with death by signal."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USER_ERROR
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        with cache_settings(getattr(args, "cache_dir", None), not getattr(args, "no_cache", False)):
            return args.run(args)
    except SpecError as error:
        print(error.render(), file=sys.stderr)
        return USER_ERROR
    except UserError as error:
        print(error.diagnostic.render({}), file=sys.stderr)
        return USER_ERROR
    except CompileFailure as error:
        print(f"qspec: build failed: {_brief(str(error), args.debug)}", file=sys.stderr)
        return CHANGED
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        sys.stderr.close()
        return OK
    except OSError as error:
        if error.filename is None:
            return _internal_error(error, args.debug)
        # a path the system refuses (too long, no permission, a loop of links, a full disk):
        # the user's file system, not a qspec bug
        print(f"qspec: error: {error.filename}: {error.strerror or error}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("qspec: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("qspec: terminated", file=sys.stderr)
        return TERMINATED
    except Exception as error:  # a bug in qspec: say so briefly unless asked for details
        return _internal_error(error, args.debug)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _brief(message: str, debug: bool) -> str:
    """A failure in one readable line: exporters and compilers explain in pages, with colors."""
    text = ANSI_ESCAPE.sub("", message).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if debug or (len(lines) <= 1 and len(text) <= 500):
        return text
    first = (lines[0] if lines else text)[:500]
    return f"{first} ... (run with --debug for the whole message)"


def _internal_error(error: Exception, debug: bool) -> int:
    if debug:
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

    compile_ = commands.add_parser(
        "compile",
        help="compile a spec to a verified build folder",
        description="Load the model (this runs the spec's Python entries), capture it, run the "
        "passes, emit the artifact, verify it against the float model on held-out samples and "
        "write DIR/model.onnx, DIR/manifest.json, DIR/report.json and DIR/report.md.",
        epilog="example:\n  qspec compile examples/minilm/int4.qspec -o build/int4 "
        "--fail-under cosine=0.97",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compile_.add_argument("spec", metavar="SPEC")
    compile_.add_argument("-o", "--output", required=True, metavar="DIR", help="build folder")
    compile_.add_argument(
        "--fail-under",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="exit 1 when fidelity is below VALUE (cosine, cosine_min, cosine_p1, snr, top1; "
        "with several held-out sources, the worst source)",
    )
    compile_.add_argument("--timings", action="store_true", help="print the time of each stage")
    compile_.add_argument(
        "--depfile",
        metavar="FILE",
        help="write a Make-format depfile: DIR/manifest.json depends on every file the build "
        "read (FILE must be outside DIR)",
    )
    compile_.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 0 if DIR is up to date with the spec and its inputs, 1 if not",
    )
    compile_.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout (everything else goes to stderr)",
    )
    _cache_options(compile_)
    compile_.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress output on stderr: auto shows it only on a terminal",
    )
    compile_.set_defaults(command="compile", run=run_compile)

    cache = commands.add_parser(
        "cache",
        help="show or clear the cache",
        description="The cache holds whole builds (restored when the spec and the content of "
        "every input match), per-layer results, and latency and tuning measurements.",
        epilog="examples:\n  qspec cache info\n  qspec cache clear",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cache.add_argument("action", choices=("info", "clear"))
    cache.add_argument("--cache-dir", metavar="DIR", help="the cache folder (default: see info)")
    cache.set_defaults(command="cache", run=run_cache)

    sweep = commands.add_parser(
        "sweep",
        help="compile a spec at several values of one budget",
        description="Compile SPEC once per value of one budget (replacing the spec's own limit "
        "of that metric), each into DIR/<budget>/, and write DIR/sweep.md, DIR/sweep.json and "
        "DIR/sweep.png (held-out fidelity against artifact bytes). The candidates' sensitivity "
        "is measured once for all points.",
        epilog='examples:\n  qspec sweep examples/minilm/mixed.qspec --budget "weight bits=3..6 '
        'step 0.5" -o build/sweep\n  qspec sweep spec.qspec --budget "size=12,16,20 MB" -o out',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("spec", metavar="SPEC")
    sweep.add_argument(
        "--budget",
        required=True,
        metavar="RANGE",
        help='"METRIC=LOW..HIGH step STEP [UNIT]" or "METRIC=V1,V2,... [UNIT]"; METRIC is '
        "weight bits, size, bops or latency",
    )
    sweep.add_argument("-o", "--output", required=True, metavar="DIR", help="sweep folder")
    sweep.add_argument("--timings", action="store_true", help="print the time of each stage")
    _cache_options(sweep)
    sweep.set_defaults(command="sweep", run=run_sweep)

    run = commands.add_parser(
        "run",
        help="run a build folder on arrays",
        description="Run the artifact of a build folder with its own runtime.",
        epilog="example:\n  qspec run build/int4 --input in.npz --output out.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("folder", metavar="DIR")
    run.add_argument(
        "--input", required=True, metavar="IN.npz", help="arrays named like the inputs"
    )
    run.add_argument("--output", required=True, metavar="OUT.npz")
    run.add_argument(
        "--backend",
        metavar="NAME",
        help="onnx, tvm, or a target's name (tvm_sm80); default: the spec's first target",
    )
    run.set_defaults(command="run", run=run_artifact)

    explain = commands.add_parser(
        "explain",
        help="show which rule decided what for each layer",
        description="Load and capture the model (this runs the spec's model entry), resolve the "
        "rules and print the per-layer table and each rule's match count.",
        epilog="examples:\n  qspec explain examples/minilm/mixed.qspec\n"
        "  qspec explain examples/minilm/mixed.qspec --build build/mixed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("spec", metavar="SPEC")
    explain.add_argument(
        "--build",
        metavar="DIR",
        help="a build folder of SPEC: show the candidate the allocator chose for each layer",
    )
    explain.set_defaults(command="explain", run=run_explain)
    return parser


def _cache_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="the cache folder (beats $QSPEC_CACHE_DIR, which beats $XDG_CACHE_HOME/qspec)",
    )
    command.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor fill the build and per-layer caches",
    )


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
        name = "<stdin>" if path == "-" else path
        if path == "-":
            source, problem = decode_source(sys.stdin.buffer.read(MAX_SPEC_BYTES + 1), name)
        else:
            source, problem = read_source(path)
        if problem:
            _report([problem], {})
            status = USER_ERROR
            continue
        assert source is not None
        text = source  # as written: a BOM or CR line ends count as changes
        formatted, diagnostics = format_text(text, name)
        if formatted is None:
            _report(diagnostics, {name: normalize(text)})
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
            try:
                _rewrite_in_place(Path(path), formatted)
            except OSError as error:  # read-only, disk full, ...: say so and go on
                message = f"cannot write file: {error.strerror or error}"
                _report([Diagnostic("error", message, Span(path, 0, 0, 0, 0))], {})
                status = USER_ERROR
                continue
            print(f"formatted {path}", file=sys.stderr)
    return status


def _rewrite_in_place(path: Path, text: str) -> None:
    """Rewrite the file `path` names in place, through symlinks: the inode stays (hard links
    stay one file), and with it the owner and mode. Space for a longer text is reserved before
    any byte changes, and Ctrl-C and SIGTERM wait until the new text is whole, so neither a full
    disk nor an interrupt leaves half a file."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, "not a regular file")
        if len(data) > info.st_size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, info.st_size, len(data) - info.st_size)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], written)
            os.ftruncate(fd, len(data))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.fsync(fd)
    finally:
        os.close(fd)


# --fail-under metrics and the values each can take (the report's field names work too)
FAIL_UNDER = {
    "cosine": (-1.0, 1.0),
    "cosine_min": (-1.0, 1.0),
    "cosine_p1": (-1.0, 1.0),
    "snr": None,
    "top1": (0.0, 1.0),
}
FAIL_UNDER_ALIASES = {"cosine_mean": "cosine", "snr_db": "snr", "top1_agreement": "top1"}


def _thresholds(pairs: list[str]) -> dict[str, float]:
    """The --fail-under floors, checked before any work: a misspelled metric or a NaN floor
    would otherwise pass every build (or fail every one) after minutes of compiling."""
    thresholds: dict[str, float] = {}
    for pair in pairs:
        name, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or not name or not value:
            raise UserError(
                f"--fail-under expects METRIC=VALUE, got '{pair}'", help="for example cosine=0.99"
            )
        if name not in FAIL_UNDER and name not in FAIL_UNDER_ALIASES:
            raise UserError(
                f"--fail-under: unknown metric '{name}'",
                expected="one of " + ", ".join(FAIL_UNDER),
                help=did_you_mean(name, [*FAIL_UNDER, *FAIL_UNDER_ALIASES]),
            )
        try:
            floor = float(value)
        except ValueError:
            raise UserError(f"--fail-under {name}: '{value}' is not a number") from None
        bounds = FAIL_UNDER[FAIL_UNDER_ALIASES.get(name, name)]
        if not math.isfinite(floor) or (bounds and not bounds[0] <= floor <= bounds[1]):
            within = f"from {bounds[0]:g} to {bounds[1]:g}" if bounds else "a finite number"
            raise UserError(f"--fail-under {name}={value}: the floor must be {within}")
        if name in thresholds:
            raise UserError(f"--fail-under {name} is given twice")
        thresholds[name] = floor
    return thresholds


def _check_source_date_epoch() -> None:
    """SOURCE_DATE_EPOCH is whole seconds since 1970 (reproducible-builds.org); libraries
    that stamp files parse it with int() deep inside a build."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is not None and not value.strip().isdigit():
        raise UserError(
            f"SOURCE_DATE_EPOCH={value!r:.40} is not a whole number of seconds since 1970",
            help="unset it, or set it to e.g. $(git log -1 --format=%ct)",
        )


def run_compile(args: argparse.Namespace) -> int:
    from qspec.build import build, up_to_date

    fail_under = _thresholds(args.fail_under)  # options first: no model loads for a typo
    _check_source_date_epoch()
    if args.check:
        current, reason = up_to_date(args.spec, args.output)
        if args.json:
            print(json.dumps({"folder": args.output, "up_to_date": current, "reason": reason}))
        else:
            print(reason, file=sys.stderr)
        return OK if current else CHANGED
    progress = Progress(args.progress)
    log = progress.show
    if args.timings:
        log = progress.and_print
    with progress, _stdout_to_stderr(args.json):
        outcome = build(
            args.spec, args.output, fail_under=fail_under, depfile=args.depfile, log=log
        )
    if args.json:
        print(json.dumps(machine_summary(outcome), indent=1))
    else:
        print(summary(outcome.manifest, outcome.report, outcome.latency_ms))
        if outcome.cache == "up to date":
            print(f"{args.output} was up to date: nothing done")
        if outcome.cache == "hit":
            print(
                f"restored from the cache in {outcome.timings['restore']:.2f} s "
                "(latency as measured when it was built)"
            )
    return OK


@contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    """With --json, stdout carries the one JSON object: what the spec's code prints (from
    Python or from a child process) goes to stderr meanwhile."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class Progress:
    """One status line on stderr that each stage overwrites, only where it is wanted: on a
    terminal (`auto`) or always; `never` and non-terminals also silence third-party bars."""

    def __init__(self, mode: str):
        self.on = mode == "always" or (mode == "auto" and sys.stderr.isatty())
        if not self.on:
            os.environ["TQDM_DISABLE"] = "1"
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        self.shown = False

    def show(self, line: str) -> None:
        if self.on:
            print(f"\r{line[:79]:<79}", end="", file=sys.stderr, flush=True)
            self.shown = True

    def and_print(self, line: str) -> None:
        self.clear()
        print(f"  {line}", file=sys.stderr)

    def clear(self) -> None:
        if self.shown:
            print("\r" + " " * 79 + "\r", end="", file=sys.stderr, flush=True)
            self.shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()


def machine_summary(outcome) -> dict:
    """What `--json` prints: where the build is, its artifacts with their hashes, fidelity,
    budgets, timings and whether the cache served it."""
    manifest, report = outcome.manifest, outcome.report
    files = manifest.get("files", {})
    targets = []
    for target in manifest["targets"]:
        path = outcome.folder / target["file"]
        targets.append(
            {
                "name": target["name"],
                "backend": target["backend"],
                "device": target.get("device"),
                "file": str(path),
                "bytes": path.stat().st_size,
                "sha256": files.get(target["file"]),
                "verified": target.get("verified", False),
                "fidelity": target.get("fidelity"),
            }
        )
    return {
        "folder": str(outcome.folder),
        "manifest": str(outcome.folder / "manifest.json"),
        "cache": outcome.cache,
        "artifacts": targets,
        "fidelity": report.get("fidelity"),
        "budgets": manifest.get("budgets", []),
        "totals": manifest["totals"],
        "latency_ms": outcome.latency_ms,
        "timings_s": {name: round(seconds, 3) for name, seconds in outcome.timings.items()},
        "inputs": [str(path) for path in outcome.inputs],
    }


def run_cache(args: argparse.Namespace) -> int:
    from qspec import buildcache

    if args.action == "clear":
        freed = buildcache.clear()
        print(f"removed {freed / 1e6:.1f} MB from {buildcache.cache_dir()}")
        return OK
    info = buildcache.info()
    print(f"folder: {info['folder']}")
    used = info["least_recently_used"]
    print(f"builds: {info['builds']}" + (f" (least recently used: {used})" if used else ""))
    print(f"per-layer results: {info['layer_results']}")
    for name, size in info["bytes"].items():
        print(f"  {name}: {size / 1e6:.1f} MB")
    print(f"total: {info['total_bytes'] / 2**20:.1f} MiB of {info['limit_bytes'] / 2**30:.1f} GiB")
    return OK


def summary(manifest: dict, report: dict, latency: dict[str, float]) -> str:
    totals = manifest["totals"]
    target = manifest["targets"][0]
    ratio = float(totals["float_to_artifact"])
    # a tiny model's artifact can outgrow its float weights (scales, zero points, graph)
    size = f"{ratio}x smaller" if ratio >= 1 else f"{1 / ratio:.3f}x larger"
    lines = [
        f"built {target['file']}: {totals['artifact_bytes'] / 1e6:.2f} MB "
        f"({size} than float, {totals['artifact_to_min']}x the theoretical minimum)",
    ]
    for entry in report["targets"]:
        fidelity = entry.get("fidelity")
        where = f"{entry['name']} ({entry['file']})"
        if fidelity is None:
            lines.append(f"{where}: compiled for {entry['device']}, not run: {entry['skipped']}")
            continue
        line = (
            f"{where} fidelity on {fidelity['samples']} held-out samples: cosine mean "
            f"{float(fidelity['cosine_mean']):.5f}, min {float(fidelity['cosine_min']):.5f}, "
            f"SNR {float(fidelity['snr_db']):.1f} dB"  # float(): report.json writes "inf"
        )
        if fidelity.get("top1_agreement") is not None:
            line += (
                f", top-1 agreement {float(fidelity['top1_agreement']):.4f}, accuracy "
                f"{float(fidelity['accuracy_artifact']):.4f} "
                f"(float {float(fidelity['accuracy_float']):.4f})"
            )
        if fidelity.get("outputs"):
            line += f" (the worst of {len(fidelity['outputs'])} outputs; {_worst(fidelity)})"
        lines.append(line)
    lines += [f"latency {name}: {ms:.2f} ms" for name, ms in latency.items()]
    return "\n".join(lines)


def _worst(fidelity: dict) -> str:
    """The output with the lowest mean cosine, so a user sees which output is bad."""
    worst = min(fidelity["outputs"], key=lambda o: _sortable(float(o["cosine_mean"])))
    return f"lowest cosine {worst['name']}"


def _sortable(value: float) -> float:
    return float("-inf") if math.isnan(value) else value


def run_sweep(args: argparse.Namespace) -> int:
    from qspec.pareto import sweep_spec

    _check_source_date_epoch()
    log = (lambda line: print(f"  {line}", file=sys.stderr)) if args.timings else (lambda _: None)
    rows = sweep_spec(args.spec, args.budget, args.output, log)
    for row in rows:
        if row["status"] == "ok":
            print(
                f"{row['budget']}: {row['artifact_bytes'] / 1e6:.2f} MB, cosine "
                f"{row['cosine_mean']:.5f}, measured {row['measured']}"
            )
        else:
            print(f"{row['budget']}: {row['status']}")
    print(f"wrote {Path(args.output) / 'sweep.md'} and sweep.png")
    return OK


def run_artifact(args: argparse.Namespace) -> int:
    from qspec.runtime import load

    output = _output_file(args.output)  # before the model runs: a bad path fails at once
    if Path(args.input).resolve() == output:
        raise UserError(f"--output {args.output} is the --input file: it would be replaced")
    if output.is_relative_to(Path(args.folder).resolve()):
        raise UserError(f"--output {args.output} is inside the build folder it runs")
    runner = load(args.folder, args.backend)
    outputs = runner(_read_npz(args.input))
    _write_npz(output, args.output, outputs)
    print(", ".join(f"{name} {list(array.shape)}" for name, array in outputs.items()))
    return OK


def _read_npz(given: str) -> dict:
    """The arrays of an .npz, as data only: never unpickled, and only from a regular file (a
    FIFO or device could block or never end)."""
    import zipfile

    import numpy as np

    help = "save the inputs with numpy.savez(path, NAME=array, ...), named like the model's"
    if not Path(given).is_file():
        what = "no such file" if not Path(given).exists() else "not a regular file"
        raise UserError(f"cannot read {given}: {what}", help=help)
    try:
        loaded = np.load(given, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{given} is a .npy array, not an .npz of named arrays", help=help)
        with loaded as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile) as error:
        raise UserError(f"cannot read {given}: {numpy_load_error(error)}", help=help) from None


def _output_file(given: str) -> Path:
    """Where `--output` writes: the path with symlinks followed, which must be a regular file
    or nothing yet, in a folder that exists."""
    help = "give --output a file path in an existing folder, such as out.npz"
    try:
        path = Path(given).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise UserError(f"cannot write {given}: {error}", help=help) from None
    if path.exists() and not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file (a device or FIFO)"
        raise UserError(f"cannot write {given}: it is {what}", help=help)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {given}: no folder {path.parent}", help=help)
    return path


def _write_npz(path: Path, given: str, arrays: dict) -> None:
    """Write the arrays into a temporary file beside `path`, renamed over it in one step:
    a reader never sees half a file, and a failed write leaves nothing behind."""
    import contextlib

    import numpy as np

    from qspec.compiler.folder import umask

    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask()
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as error:
        raise UserError(f"cannot write {given}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, allow_pickle=False, **arrays)
            os.fchmod(file.fileno(), mode)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise UserError(f"cannot write {given}: {error.strerror or error}") from None
        raise


def run_explain(args: argparse.Namespace) -> int:
    from qspec.driver import explain_spec

    print(explain_spec(args.spec, args.build))
    return OK
