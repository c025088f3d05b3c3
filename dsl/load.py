"""From a path to a checked Spec: read, parse, splice includes, merge, validate."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from errno import EINVAL

from qspec.dsl import ir
from qspec.dsl.diagnostics import Diagnostic, Note, SpecError
from qspec.dsl.files import read_regular
from qspec.dsl.parser import gc_paused, normalize, parse_document
from qspec.dsl.validate import LANGUAGE_VERSION, check

SINGLETONS = {
    ir.ModelSource: "model",
    ir.Calibration: "calibration",
    ir.Evaluate: "evaluate",
    ir.Allocate: "allocate",
}
MAX_SPEC_BYTES = 16 * 2**20  # far above any real spec; bounds memory on a hostile one
MAX_INCLUDE_DEPTH = 64  # a chain this deep is a mistake (and deeper ones would exhaust the stack)


@dataclass
class Checked:
    """The outcome of checking a spec: the Spec when it has no errors, and every diagnostic."""

    spec: ir.Spec | None
    diagnostics: list[Diagnostic]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def raise_errors(self) -> ir.Spec:
        if self.spec is None or self.errors:
            raise SpecError(self.diagnostics, self.sources)
        return self.spec


def read_source(path: str) -> tuple[str | None, Diagnostic | None]:
    """The text of a spec file as written (for `fmt` to compare against), or a diagnostic that
    says why it cannot be read. Parsing normalizes it (see `normalize`)."""
    try:
        data = read_regular(path, MAX_SPEC_BYTES)
    except OSError as error:
        return None, Diagnostic(
            "error",
            f"cannot read file: {error.strerror or error}",
            ir.Span(path, 0, 0, 0, 0),
            help="a spec is a regular UTF-8 text file" if error.errno == EINVAL else None,
        )
    return decode_source(data, path)


def decode_source(data: bytes, path: str) -> tuple[str | None, Diagnostic | None]:
    """The text of a spec's bytes, or a diagnostic at the first byte that is not UTF-8."""
    if len(data) > MAX_SPEC_BYTES:
        message = f"too large for a spec (over {MAX_SPEC_BYTES // 2**20} MiB)"
        return None, Diagnostic("error", message, ir.Span(path, 0, 0, 0, 0))
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        span = ir.Span(path, line, column, line, column + 1)
        return None, Diagnostic(
            "error",
            f"not a text file: byte 0x{data[error.start]:02x} is not UTF-8",
            span,
            help="a .qspec file is UTF-8 text",
        )


def check_file(path: str | os.PathLike[str], text: str | None = None) -> Checked:
    """Parse and validate a spec and everything it includes; never raises on user mistakes."""
    loader = _Loader()
    root = os.fspath(path)
    with gc_paused():
        statements = loader.document(root, text, stack=())
        if loader.failed:
            return Checked(None, loader.diagnostics, loader.sources)
        spec = _merge(root, statements, tuple(loader.sources), loader.diagnostics)
        loader.diagnostics += check(spec)
    return Checked(spec, loader.diagnostics, loader.sources)


def load_spec(path: str | os.PathLike[str]) -> ir.Spec:
    """The checked Spec at `path`; raises SpecError with every diagnostic on mistakes."""
    return check_file(path).raise_errors()


class _Loader:
    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []
        self.sources: dict[str, str] = {}

    @property
    def failed(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)

    def document(self, path: str, text: str | None, stack: tuple[str, ...]) -> list[ir.Statement]:
        """The statements of `path` with includes spliced in place."""
        if text is None:
            text, problem = read_source(path)
            if problem:
                self.diagnostics.append(problem)
                return []
        assert text is not None
        text = normalize(text)
        self.sources[path] = text
        document, diagnostics = parse_document(text, path)
        self.diagnostics += diagnostics
        if document is None:
            return []
        self.version_header(document)
        statements: list[ir.Statement] = []
        for statement in document.statements:
            if isinstance(statement, ir.Include):
                statements += self.include(path, statement, (*stack, path))
            elif not isinstance(statement, ir.Version):
                statements.append(statement)
        return statements

    def include(
        self, parent: str, include: ir.Include, stack: tuple[str, ...]
    ) -> list[ir.Statement]:
        target = os.path.normpath(os.path.join(os.path.dirname(parent), include.path.text))
        if target in stack:
            chain = " -> ".join([*stack[stack.index(target) :], target])
            self.error(f"include cycle: {chain}", include.path.span)
            return []
        if target in self.sources:
            return []  # included already: a file's statements count once, where first included
        if not target.endswith(".qspec"):  # no other file is parsed, or echoed in a diagnostic
            self.error(
                f"'{include.path.text}' is not a .qspec file",
                include.path.span,
                help='include names another spec, such as include "common.qspec"',
            )
            return []
        if not os.path.exists(target):
            self.error(
                f"cannot find included file '{include.path.text}'",
                include.path.span,
                help=f"looked for {target} (includes are relative to the including file)",
            )
            return []
        if len(stack) >= MAX_INCLUDE_DEPTH:
            self.error(
                f"includes nest more than {MAX_INCLUDE_DEPTH} files deep",
                include.path.span,
                help="include the shared files from one top-level spec instead of in a chain",
            )
            return []
        text, problem = read_source(target)
        if problem is not None and problem.span.line > 0:  # located in that file: not UTF-8
            self.diagnostics.append(problem)
            return []
        if problem is not None:
            message = problem.message.replace("cannot read file", "cannot read included file")
            self.error(f"{message}: {target}", include.path.span, help=problem.help)
            return []
        return self.document(target, text, stack)

    def version_header(self, document: ir.Document) -> None:
        versions = [s for s in document.statements if isinstance(s, ir.Version)]
        first = document.statements[0] if document.statements else None
        if not isinstance(first, ir.Version):
            span = first.span if first else ir.Span(document.path, 1, 1, 1, 1)
            self.error(
                "a spec starts with its language version",
                span,
                expected=f"'qspec {LANGUAGE_VERSION}' on the first line",
            )
        for version in versions:
            if version.number.value != LANGUAGE_VERSION:
                self.error(
                    f"language version {version.number.value} is not supported",
                    version.number.span,
                    help=f"this qspec reads version {LANGUAGE_VERSION}",
                )
        for extra in versions[1:]:
            self.error("the version is declared twice", extra.span)

    def error(
        self, message: str, span: ir.Span, expected: str | None = None, help: str | None = None
    ) -> None:
        self.diagnostics.append(Diagnostic("error", message, span, expected, help))


def _merge(
    path: str, statements: list[ir.Statement], files: tuple[str, ...], diagnostics: list[Diagnostic]
) -> ir.Spec:
    singles: dict[str, ir.Statement] = {}
    targets: list[ir.Target] = []
    defaults: list[ir.Defaults] = []
    layers: list[ir.LayerRule] = []
    ties: list[ir.Tie] = []
    limits: list[ir.Limit] = []
    verify: list[ir.Verify] = []
    for statement in statements:
        name = SINGLETONS.get(type(statement))
        if name is not None:
            if name in singles:
                diagnostics.append(
                    Diagnostic(
                        "error",
                        f"{name} is given twice",
                        statement.span,
                        help="a spec has one; remove this one or the first",
                        notes=(Note("first given here", singles[name].span),),
                    )
                )
            else:
                singles[name] = statement
        elif isinstance(statement, ir.Target):
            targets.append(statement)
        elif isinstance(statement, ir.Verify):
            verify.append(statement)
        elif isinstance(statement, ir.Defaults):
            defaults.append(statement)
        elif isinstance(statement, ir.LayerRule):
            layers.append(statement)
        elif isinstance(statement, ir.Tie):
            ties.append(statement)
        elif isinstance(statement, ir.Budget):
            limits += statement.limits
    return ir.Spec(
        path=path,
        model=singles.get("model"),  # type: ignore[arg-type]
        calibration=singles.get("calibration"),  # type: ignore[arg-type]
        verify=tuple(verify),
        evaluate=singles.get("evaluate"),  # type: ignore[arg-type]
        targets=tuple(targets),
        rules=(*defaults, *layers),
        ties=tuple(ties),
        limits=tuple(limits),
        allocate=singles.get("allocate"),  # type: ignore[arg-type]
        files=files,
    )
