"""The canonical formatter: IR back to text, with the file's comments kept in place.

One statement per line, two-space indentation, options in a fixed order, at most one blank line
between statements. A comment stays before the statement it preceded, or at the end of the line
it ended; a comment inside a one-line construct moves just above it.
"""

from __future__ import annotations

import re
from collections import deque

from qspec.dsl import ir
from qspec.dsl.diagnostics import Diagnostic
from qspec.dsl.parser import parse_document

INDENT = "  "
WIDTH = 100


def format_text(text: str, path: str) -> tuple[str | None, list[Diagnostic]]:
    """The formatted text, or None and the syntax diagnostics when the file does not parse."""
    document, diagnostics = parse_document(text, path)
    if document is None:
        return None, diagnostics
    return format_document(document), diagnostics


def format_document(document: ir.Document) -> str:
    printer = _Printer(document.comments)
    for statement in document.statements:
        printer.node(statement, 0)
    printer.rest(0)
    return "\n".join(printer.lines).strip("\n") + "\n"


# ---- rendering of single nodes -----------------------------------------------------------------


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_pattern(pattern: ir.Pattern) -> str:
    return f're"{pattern.text}"' if pattern.regex else quote(pattern.text)


def number(num: ir.Num) -> str:
    value = num.value
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _name_or_string(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) else quote(text)


def _words(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


def _opt(keyword: str, value: ir.Word | ir.Num | None) -> str | None:
    if value is None:
        return None
    return f"{keyword} {value.text if isinstance(value, ir.Word) else number(value)}"


def render_granularity(granularity: ir.Granularity | None) -> str | None:
    if granularity is None:
        return None
    if granularity.kind == "group":
        assert granularity.size is not None
        return f"group {number(granularity.size)}"
    return granularity.kind


def render_flag(flag: ir.Flag | None, yes: str, no: str) -> str | None:
    return None if flag is None else (yes if flag.value else no)


def render_weight_options(options: ir.WeightOptions) -> str:
    rounding = options.rounding
    return _words(
        render_granularity(options.granularity),
        render_flag(options.symmetric, "symmetric", "asymmetric"),
        _opt("scale", options.scale),
        _words(
            f"round {rounding.method.text}",
            _opt("damp", rounding.damp),
            render_flag(rounding.actorder, "actorder", ""),
        )
        if rounding
        else None,
        "search " + " ".join(t.text for t in options.search.targets) if options.search else None,
    )


def render_sparsity_pattern(sparsity: ir.Sparsity) -> str:
    pattern = sparsity.pattern
    if pattern is None:
        return "none"
    if isinstance(pattern, ir.NofM):
        text = f"{number(pattern.n)}:{number(pattern.m)}"
    else:
        text = number(pattern.value) + ("%" if pattern.percent else "")
    return _words(text, _opt("by", sparsity.method))


def render_lowrank_options(lowrank: ir.LowRank) -> str:
    return _words(
        f"rank {number(lowrank.rank)}",
        _opt("by", lowrank.method),
        _opt("finetune steps", lowrank.finetune_steps),
        _opt("factors", lowrank.factors),
    )


def render_candidate(candidate: ir.Candidate) -> str:
    if candidate.format is None:
        return "keep"
    return _words(
        candidate.format.text,
        render_weight_options(candidate.options),
        "sparsity " + render_sparsity_pattern(candidate.sparsity) if candidate.sparsity else None,
        render_lowrank_options(candidate.lowrank) if candidate.lowrank else None,
    )


def render_setting(setting: ir.Setting, indent: int) -> list[str]:
    """A setting as one or more lines (a long `choose` list breaks one candidate a line)."""
    pad = INDENT * indent
    if isinstance(setting, ir.Weight):
        options = render_weight_options(setting.options)
        if setting.candidates is None:
            assert setting.format is not None
            return [pad + _words("weight", setting.format.text, options)]
        items = [render_candidate(c) for c in setting.candidates]
        line = pad + _words("weight choose [" + ", ".join(items) + "]", options)
        if len(line) <= WIDTH:
            return [line]
        inner = pad + INDENT
        return [
            pad + "weight choose [",
            *(f"{inner}{i}," for i in items),
            pad + _words("]", options),
        ]
    return [pad + _render_simple_setting(setting)]


def render_calibrate(calibrate: ir.Calibrate | None) -> str | None:
    if calibrate is None:
        return None
    value = number(calibrate.value) if calibrate.value else None
    return _words(_opt("calibrate", calibrate.method), value)


def _render_simple_setting(setting: ir.Setting) -> str:
    if isinstance(setting, ir.Activation):
        if setting.format is None:
            return "activation none"
        return _words(
            "activation",
            setting.format.text,
            render_granularity(setting.granularity),
            render_flag(setting.symmetric, "symmetric", "asymmetric"),
            render_flag(setting.dynamic, "dynamic", "static"),
            render_calibrate(setting.calibrate),
        )
    if isinstance(setting, ir.Sparsity):
        return "sparsity " + render_sparsity_pattern(setting)
    if isinstance(setting, ir.LowRank):
        return "compensate lora " + render_lowrank_options(setting)
    if isinstance(setting, ir.BiasCorrection):
        return "compensate bias"
    if isinstance(setting, ir.CompensateNone):
        return "compensate none"
    assert isinstance(setting, ir.Keep)
    return "keep"


def render_limit(limit: ir.Limit) -> str:
    value = number(limit.value)
    unit = limit.unit.text if limit.unit else None
    target = _opt("on", limit.target)
    if limit.metric == "weight_bits":
        return f"weight bits <= {value}"
    return _words(f"{limit.metric} <= {value}", unit, target)


def render_line(statement: ir.Statement) -> str:
    """A statement that is always one line."""
    if isinstance(statement, ir.Version):
        return f"qspec {number(statement.number)}"
    if isinstance(statement, ir.Include):
        return f"include {quote(statement.path.text)}"
    if isinstance(statement, ir.ModelSource):
        kind = {"python": None, "hf": "hf", "exported": "exported"}[statement.kind]
        return _words("model", kind, quote(statement.path.text))
    if isinstance(statement, ir.Calibration):
        sources = statement.sources
        return _words(
            "calibration",
            ", ".join(_words(quote(s.path.text), _opt("weight", s.weight)) for s in sources),
            _opt("samples", statement.samples),
            _opt("holdout", statement.holdout),
            _opt("mode", statement.mode),
        )
    if isinstance(statement, ir.Verify):
        return _words("verify", quote(statement.source.text), _opt("samples", statement.samples))
    if isinstance(statement, ir.Evaluate):
        return f"evaluate {quote(statement.entry.text)}"
    if isinstance(statement, ir.Target):
        body = _words(
            _opt("device", statement.device),
            _opt("arch", statement.arch),
            "mcpu " + _name_or_string(statement.mcpu.text) if statement.mcpu else None,
            _opt("opset", statement.opset),
            _opt("tune trials", statement.tune_trials),
        )
        return _words(
            "target",
            statement.backend.text,
            _opt("as", statement.alias),
            body and "{ " + body + " }",
        )
    if isinstance(statement, ir.Tie):
        return f"tie {render_pattern(statement.pattern)}"
    if isinstance(statement, ir.Allocate):
        return _words(
            "allocate",
            statement.strategy.text,
            _opt("generations", statement.generations),
            _opt("offspring", statement.offspring),
            _opt("seed", statement.seed),
            _opt("fitness", statement.fitness),
            _opt("sensitivity", statement.sensitivity),
        )
    raise TypeError(f"not a one-line statement: {type(statement).__name__}")


def _block(
    statement: ir.Statement | ir.Setting | ir.Limit,
) -> tuple[str, tuple[ir.Setting, ...] | tuple[ir.Limit, ...]] | None:
    """(header, children) for statements written as a brace block."""
    if isinstance(statement, ir.Defaults):
        return "defaults {", statement.settings
    if isinstance(statement, ir.LayerRule):
        return f"layer {render_pattern(statement.pattern)} {{", statement.settings
    if isinstance(statement, ir.Budget):
        return "budget {", statement.limits
    return None


# ---- layout with comments ----------------------------------------------------------------------


class _Printer:
    def __init__(self, comments: tuple[ir.Comment, ...]):
        self.comments = deque(sorted(comments, key=lambda c: (c.span.line, c.span.column)))
        self.lines: list[str] = []
        self.last_line = 0  # source line of what was printed last

    def node(
        self, node: ir.Statement | ir.Setting | ir.Limit, indent: int, closing_line: int = 0
    ) -> None:
        """Print a node; a comment on `closing_line` belongs to the enclosing block's '}'."""
        span = node.span
        self.comments_before(span.line, indent)
        self.gap(span.line)
        block = _block(node)
        if block is None:
            self.comments_before(span.end_line, indent, gaps=False)  # inside a one-line construct
            if isinstance(node, ir.Limit):
                lines = [INDENT * indent + render_limit(node)]
            elif isinstance(node, ir.Statement):
                lines = [INDENT * indent + render_line(node)]
            else:
                lines = render_setting(node, indent)
            if span.end_line != closing_line:
                lines[-1] += self.trailing(span.end_line)
            self.lines += lines
            self.last_line = span.end_line
            return
        header, children = block
        pad = INDENT * indent
        if not children and not self.has_comment_before(span.end_line):
            self.lines.append(pad + header + "}" + self.trailing(span.end_line))
            self.last_line = span.end_line
            return
        shares_line = children[0].span.line == span.line if children else False
        self.lines.append(pad + header + ("" if shares_line else self.trailing(span.line)))
        self.last_line = span.line
        for child in children:
            self.node(child, indent + 1, closing_line=span.end_line)
        self.comments_before(span.end_line, indent + 1)
        self.lines.append(pad + "}" + self.trailing(span.end_line))
        self.last_line = span.end_line

    def gap(self, line: int) -> None:
        opened = self.lines and self.lines[-1].endswith("{")
        if self.last_line and line > self.last_line + 1 and not opened:
            self.lines.append("")

    def has_comment_before(self, line: int) -> bool:
        return bool(self.comments) and self.comments[0].span.line < line

    def comments_before(self, line: int, indent: int, *, gaps: bool = True) -> None:
        while self.has_comment_before(line):
            comment = self.comments.popleft()
            if gaps:
                self.gap(comment.span.line)
            self.lines.append(INDENT * indent + comment.text.rstrip())
            self.last_line = comment.span.line

    def trailing(self, line: int) -> str:
        if self.comments and self.comments[0].span.line == line:
            return "  " + self.comments.popleft().text.rstrip()
        return ""

    def rest(self, indent: int) -> None:
        self.comments_before(1 << 62, indent)
