"""Syntax error recovery: one diagnostic per broken statement instead of one per file.

A file that does not parse is cut into top-level statements (each starts on a line whose first
word is a top-level keyword) and each piece is parsed on its own, dropping unexpected tokens, so
one run reports an error per broken statement and checks the words of the others. The parser
hands in its piece parser and keyword table, so this module does not import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import cast

from lark import Token, UnexpectedCharacters, UnexpectedInput
from lark.exceptions import UnexpectedEOF

from qspec.dsl import ir, vocabulary
from qspec.dsl.diagnostics import Diagnostic, did_you_mean, some_of
from qspec.dsl.vocabulary import Vocabulary

ErrorHandler = Callable[[UnexpectedInput], bool]
"""Lark's `on_error`: given a syntax error, whether to go on parsing."""

ParsePiece = Callable[[str, int, ErrorHandler], list[Diagnostic]]
"""Parse a piece of a file (its text, the number of lines before it, an error handler) and
return the diagnostics of its words; raises `UnexpectedInput` where the handler gives up."""


_STATEMENT_START = re.compile(
    r"^[ \t]*(?:" + "|".join(vocabulary.TOP_LEVEL_KEYWORDS) + r")\b", re.MULTILINE
)


def recover(
    text: str, path: str, parse_piece: ParsePiece, literals: Mapping[str, str]
) -> list[Diagnostic]:
    """Parse each top-level statement alone, skipping bad tokens, and report what went wrong,
    in file order. `literals` maps the grammar's terminal names to their text."""
    starts = [m.start() for m in _STATEMENT_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    diagnostics: list[Diagnostic] = []
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        piece = text[begin:end]
        line_offset = text.count("\n", 0, begin)
        skipper = _SkipBadTokens(piece, path, line_offset, literals)
        try:
            found = parse_piece(piece, line_offset, skipper)
        except UnexpectedInput as error:
            found = []
            if not (skipper.diagnostics and _at_end(error)):  # else: fallout of the first error
                found.append(_syntax_diagnostic(error, piece, path, line_offset, literals))
        diagnostics += skipper.diagnostics + found
    return sorted(diagnostics, key=lambda d: d.span)


class _SkipBadTokens:
    """Lark error handler: report an unexpected token, drop it and go on.

    Tokens dropped right after a reported one (only whitespace between them) are the same
    mistake and are not reported again.
    """

    def __init__(self, text: str, path: str, line_offset: int, literals: Mapping[str, str]):
        self.text, self.path, self.line_offset, self.literals = text, path, line_offset, literals
        self.diagnostics: list[Diagnostic] = []
        self.last_end = -1

    def __call__(self, error: UnexpectedInput) -> bool:
        token = getattr(error, "token", None)
        if token is None or token.type == "$END":
            return False
        follows = self.last_end >= 0 and not self.text[self.last_end : token.start_pos].strip()
        if not follows:
            self.diagnostics.append(
                _syntax_diagnostic(error, self.text, self.path, self.line_offset, self.literals)
            )
        self.last_end = token.end_pos
        return True


# ---- syntax errors -----------------------------------------------------------------------------

_TOKEN_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a quoted string such as "model.py:load"',
    "REGEX": 'a regex such as re"layer\\.[0-3]\\..*"',
}

# Families of keywords named as one phrase when a parser state expects all of the required
# ones; the phrase also covers the absorbed words.
_FAMILIES: tuple[tuple[frozenset[str], frozenset[str], str], ...] = (
    (
        frozenset(vocabulary.TOP_LEVEL_KEYWORDS),
        frozenset(),
        "a statement (" + ", ".join(vocabulary.TOP_LEVEL_KEYWORDS) + ")",
    ),
    (
        frozenset({"weight", "activation", "sparsity", "compensate", "keep"}),
        frozenset(),
        "a setting (weight, activation, sparsity, compensate, keep)",
    ),
    (
        frozenset({"tensor", "channel", "group", "symmetric", "asymmetric", "scale", "round"}),
        frozenset({"search", "token"}),
        "a weight option (tensor, channel, group N, symmetric, asymmetric, scale, round, search)",
    ),
    (
        frozenset({"device", "arch", "mcpu", "opset", "tune"}),
        frozenset(),
        "a target option (device, arch, mcpu, opset, tune trials N)",
    ),
    (frozenset({"lora", "bias", "none"}), frozenset(), "lora, bias or none"),
)

# What a NAME stands for, keyed by the keyword before it.
_NAME_AFTER: dict[str, Vocabulary] = {
    "weight": vocabulary.WEIGHT_FORMAT,
    "activation": vocabulary.ACTIVATION_FORMAT,
    "scale": vocabulary.SCALE_FORMAT,
    "round": vocabulary.ROUNDING,
    "search": vocabulary.SEARCH,
    "by": vocabulary.SPARSITY_METHOD,
    "target": vocabulary.BACKEND,
    "device": vocabulary.ALL_DEVICES,
    "allocate": vocabulary.ALLOCATOR,
    "factors": vocabulary.FACTOR_FORMAT,
    "mode": vocabulary.CALIBRATION_MODE,
}


def _syntax_diagnostic(
    error: UnexpectedInput, text: str, path: str, offset: int, literals: Mapping[str, str]
) -> Diagnostic:
    line, column = error.line, error.column
    previous = _previous_word(text, error.pos_in_stream if error.pos_in_stream else len(text))
    if isinstance(error, UnexpectedCharacters):
        # lark declares pos_in_stream as None on the base class; UnexpectedCharacters always sets
        # it to the lexer's offset.
        pos = cast(int, error.pos_in_stream)
        char = text[pos]
        expected = _expected(error.allowed or set(), previous, literals)
        span = ir.Span(path, line, column, line, column + 1)
        if char == '"':
            return Diagnostic(
                "error",
                "unterminated string",
                span,
                help="close the string with '\"' on the same line",
            )
        if char == "-" and text[pos + 1 : pos + 2].isdigit():
            return Diagnostic("error", "numbers here cannot be negative", span, expected)
        if char == "-":
            name = _word_around(text, pos)
            return Diagnostic(
                "error",
                "unexpected character '-'",
                span,
                expected,
                help=f'a name with dashes must be quoted: "{name}"',
            )
        return Diagnostic("error", f"unexpected character {char!r}", span, expected)

    names = _acceptable(error)
    expected = _expected(names, previous, literals)
    token = getattr(error, "token", None)
    if token is None or token.type == "$END":
        end_line = text.count("\n") + 1
        span = ir.Span(path, end_line + offset, 1, end_line + offset, 1)
        opener = _unclosed_brace(text)
        if "RBRACE" in names and opener is not None:
            line_no, col = opener
            span = ir.Span(path, line_no + offset, col, line_no + offset, col + 1)
            return Diagnostic(
                "error",
                "this '{' is never closed",
                span,
                help="add '}' after the block's last line",
            )
        return Diagnostic("error", "unexpected end of file", span, expected)

    span = ir.Span(path, token.line, token.column, token.end_line, token.end_column)
    help_text = None
    if "RBRACE" in names and str(token) in vocabulary.TOP_LEVEL_KEYWORDS:
        opener = _unclosed_brace(text[: token.start_pos])
        where = f" opened on line {opener[0] + offset}" if opener else ""
        help_text = f"the block{where} is not closed: add '}}' before this line"
    elif token.type == "NAME" or token.type in literals:
        choices = [literals[n] for n in names if n in literals and literals[n].isidentifier()]
        if names == {"NAME"} and previous in _NAME_AFTER:
            choices = list(_NAME_AFTER[previous].spellings)
        help_text = did_you_mean(str(token), choices)
    return Diagnostic("error", f"unexpected {_describe(token)}", span, expected, help_text)


def _at_end(error: UnexpectedInput) -> bool:
    token = getattr(error, "token", None)
    return isinstance(error, UnexpectedEOF) or (token is not None and token.type == "$END")


def _acceptable(error: UnexpectedInput) -> set[str]:
    """Terminals the parser would really accept here (LALR lookahead sets are too generous)."""
    interactive = getattr(error, "interactive_parser", None)
    if interactive is not None:
        return set(interactive.accepts())
    return set(getattr(error, "expected", ()))


def _word_around(text: str, position: int) -> str:
    """The run of letters, digits, '_' and '-' that contains `position`."""
    start, end = position, position
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_-"):
        start -= 1
    while end < len(text) and (text[end].isalnum() or text[end] in "_-"):
        end += 1
    return text[start:end]


def _describe(token: Token) -> str:
    if token.type == "NAME":
        return f"word '{token}'"
    if token.type == "NUMBER":
        return f"number {token}"
    if token.type == "STRING":
        return f"string {token}"
    if token.type == "REGEX":
        return f"regex {token}"
    return f"'{token}'"


def _expected(names: set[str], previous: str | None, literals: Mapping[str, str]) -> str:
    words = {literals[n] for n in names if n in literals}
    parts: list[str] = []
    for required, absorbed, phrase in _FAMILIES:
        if required <= words:
            parts.append(phrase)
            words -= required | absorbed
    parts += [f"'{word}'" for word in sorted(words, key=_keyword_order)]
    for name in ("NAME", "NUMBER", "STRING", "REGEX"):
        if name in names:
            if name == "NAME" and previous in _NAME_AFTER:
                parts.append(_NAME_AFTER[previous].expected)
            else:
                parts.append(_TOKEN_WORDS[name])
    if "$END" in names:
        parts.append("the end of the file")
    return some_of(parts, limit=8) if parts else "nothing more here"


def _keyword_order(word: str) -> tuple[bool, str]:
    return (not word.isidentifier(), word)


def _previous_word(text: str, position: int) -> str | None:
    """The word just before `position`, ignoring comments: names the slot a NAME fills."""
    before = re.sub(r"#[^\n]*", "", text[:position]).split()
    return before[-1] if before else None


def _unclosed_brace(text: str) -> tuple[int, int] | None:
    """(line, column) of the last '{' in `text` that has no matching '}'."""
    stack: list[tuple[int, int]] = []
    for number, line in enumerate(text.split("\n"), 1):
        code = re.sub(r'"(?:[^"\\\n]|\\.)*"|#.*', lambda m: " " * len(m.group()), line)
        for column, char in enumerate(code, 1):
            if char == "{":
                stack.append((number, column))
            elif char == "}" and stack:
                stack.pop()
    return stack[-1] if stack else None
