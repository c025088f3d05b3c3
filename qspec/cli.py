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
from qspec.compiler.errors import CompileFailure, UserError
from qspec.dsl.diagnostics import Diagnostic, SpecError
from qspec.dsl.format import format_text
from qspec.dsl.load import check_file, read_source

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

exit codes: 0 success, 1 build failed (or fmt --check found changes), 2 error in the spec,
            model or data, 3 internal error
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USER_ERROR
    try:
        return args.run(args)
    except SpecError as error:
        print(error.render(), file=sys.stderr)
        return USER_ERROR
    except UserError as error:
        print(error.diagnostic.render({}), file=sys.stderr)
        return USER_ERROR
    except CompileFailure as error:
        print(f"qspec: build failed: {error}", file=sys.stderr)
        return CHANGED
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
        help="exit 1 when fidelity is below VALUE (cosine, cosine_min, snr, top1)",
    )
    compile_.add_argument("--timings", action="store_true", help="print the time of each stage")
    compile_.set_defaults(command="compile", run=run_compile)

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


def _thresholds(pairs: list[str]) -> dict[str, float]:
    thresholds = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            thresholds[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--fail-under expects METRIC=VALUE, got '{pair}'") from None
    return thresholds


def run_compile(args: argparse.Namespace) -> int:
    from qspec.driver import compile_spec

    log = (lambda line: print(f"  {line}", file=sys.stderr)) if args.timings else (lambda _: None)
    build = compile_spec(args.spec, args.output, fail_under=_thresholds(args.fail_under), log=log)
    print(summary(build.manifest, build.report, build.latency_ms))
    return OK


def summary(manifest: dict, report: dict, latency: dict[str, float]) -> str:
    totals = manifest["totals"]
    target = manifest["targets"][0]
    lines = [
        f"built {target['file']}: {totals['artifact_bytes'] / 1e6:.2f} MB "
        f"({totals['float_to_artifact']}x smaller than float, "
        f"{totals['artifact_to_min']}x the theoretical minimum)",
    ]
    for entry in report["targets"]:
        fidelity = entry.get("fidelity")
        where = f"{entry['name']} ({entry['file']})"
        if fidelity is None:
            lines.append(f"{where}: compiled for {entry['device']}, not run: {entry['skipped']}")
            continue
        line = (
            f"{where} fidelity on {fidelity['samples']} held-out samples: cosine mean "
            f"{fidelity['cosine_mean']:.5f}, min {fidelity['cosine_min']:.5f}, "
            f"SNR {fidelity['snr_db']:.1f} dB"
        )
        if fidelity.get("top1_agreement") is not None:
            line += (
                f", top-1 agreement {fidelity['top1_agreement']:.4f}, accuracy "
                f"{fidelity['accuracy_artifact']:.4f} (float {fidelity['accuracy_float']:.4f})"
            )
        lines.append(line)
    lines += [f"latency {name}: {ms:.2f} ms" for name, ms in latency.items()]
    return "\n".join(lines)


def run_sweep(args: argparse.Namespace) -> int:
    from qspec.pareto import sweep_spec

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
    import numpy as np

    from qspec.runtime import load

    runner = load(args.folder, args.backend)
    try:
        with np.load(args.input) as data:
            inputs = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {args.input}: {error}") from None
    outputs = runner(inputs)
    staging = Path(args.output).with_name(f".{Path(args.output).name}.tmp.npz")
    np.savez(staging, allow_pickle=False, **outputs)
    os.replace(staging, args.output)
    print(", ".join(f"{name} {list(array.shape)}" for name, array in outputs.items()))
    return OK


def run_explain(args: argparse.Namespace) -> int:
    from qspec.driver import explain_spec

    print(explain_spec(args.spec, args.build))
    return OK
