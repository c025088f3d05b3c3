"""Compiler-style diagnostics: location, message, source line with a caret, expectation, help."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from qspec.dsl.ir import Span

Severity = Literal["error", "warning", "note"]
WIDTH = 160  # characters of a source line shown with a diagnostic


@dataclass(frozen=True)
class Note:
    message: str
    span: Span


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    message: str
    span: Span
    expected: str | None = None
    help: str | None = None
    notes: tuple[Note, ...] = field(default=())

    def render(self, sources: Mapping[str, str]) -> str:
        lines = [_located(self.severity, self.message, self.span, sources)]
        if self.expected:
            lines.append(f"  = expected {self.expected}")
        if self.help:
            lines.append(f"  = help: {self.help}")
        lines.extend(_located("note", n.message, n.span, sources) for n in self.notes)
        return "\n".join(lines)


def _located(severity: str, message: str, span: Span, sources: Mapping[str, str]) -> str:
    header = f"{span}: {severity}: {_shortened(message, WIDTH * 2)}"
    text = sources.get(span.file)
    if text is None or span.line < 1:
        return header
    source_lines = text.split("\n")  # the lines the lexer counts (not \x0c, \u2028, ...)
    if span.line > len(source_lines):
        return header
    source = source_lines[span.line - 1].expandtabs(1)
    end = span.end_column if span.end_line == span.line else len(source) + 1
    width = max(1, end - span.column)
    column = span.column
    if len(source) > WIDTH:  # a window around the span, not a megabyte of one line
        start = max(0, min(column - 1 - WIDTH // 4, len(source) - WIDTH))
        source = source[start : start + WIDTH]
        prefix = "..." if start else ""
        source = (
            prefix + source + ("..." if start + WIDTH < len(source_lines[span.line - 1]) else "")
        )
        column += len(prefix) - start
        width = max(1, min(width, len(source) - column + 1))
    gutter = " " * len(str(span.line))
    caret = " " * (column - 1) + "^" + "~" * (width - 1)
    return f"{header}\n {span.line} | {source}\n {gutter} | {caret}"


def _shortened(text: str, limit: int) -> str:
    """`text`, or its start and end around '...' when longer than `limit` characters."""
    if len(text) <= limit:
        return text
    return text[: limit // 2] + "..." + text[-limit // 4 :]


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean' help text for the closest choice, if any is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower()]
    return f"did you mean '{close[0]}'?" if close else None


def some_of(words: Iterable[str], limit: int = 6) -> str:
    """'a, b or c' for short lists, 'a, b, c, ...' beyond the limit."""
    items = list(words)
    if len(items) > limit:
        return ", ".join(items[:limit]) + ", ..."
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


class SpecError(Exception):
    """Raised with every error found; the CLI renders them and exits with code 2."""

    def __init__(self, diagnostics: list[Diagnostic], sources: Mapping[str, str]):
        super().__init__(f"{sum(d.severity == 'error' for d in diagnostics)} error(s) in spec")
        self.diagnostics = diagnostics
        self.sources = dict(sources)

    def render(self) -> str:
        return "\n".join(d.render(self.sources) for d in self.diagnostics)
