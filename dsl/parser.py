"""Text to IR: the Lark parser, one Transformer into `ir` dataclasses, and syntax diagnostics.

A file parses in one pass. When it has syntax errors, it is cut into top-level statements
(each starts on a line whose first word is a top-level keyword) and each piece is parsed on its
own, so one run reports an error per broken statement and checks the words of the others.
"""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, UnexpectedCharacters, UnexpectedInput
from lark.exceptions import UnexpectedEOF
from lark.lexer import Lexer, PatternStr

from qspec.dsl import ir, vocabulary
from qspec.dsl.diagnostics import Diagnostic, Note, did_you_mean, some_of
from qspec.dsl.vocabulary import Vocabulary

GRAMMAR = Path(__file__).with_name("qspec.lark")


_TOKEN = re.compile(
    r"""(?P<WS>[ \t\f\r\n]+)
      | (?P<COMMENT>\#[^\n]*)
      | (?P<REGEX>re"(?:[^"\\\n]|\\.)*")
      | (?P<STRING>"(?:[^"\\\n]|\\.)*")
      | (?P<NAME>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<NUMBER>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
      | (?P<PUNCT><=|[{}\[\],:%])""",
    re.VERBOSE,
)


class _Lexer(Lexer):
    """One master regex instead of Lark's lexer: the language is small, specs can be large.

    A keyword is lexed as a NAME where the parser cannot take the keyword but takes a NAME
    (`fitness evaluate`), which is what Lark's contextual lexer would do. Comments go to
    `self.comments` for the formatter.
    """

    __future_interface__ = 2

    def __init__(self, conf: Any):
        self.keywords = {
            t.pattern.value: t.name for t in conf.terminals if isinstance(t.pattern, PatternStr)
        }
        self.comments: list[Token] = []
        self.line_offset = 0

    def lex(self, state: Any, parser_state: Any) -> Iterator[Token]:
        text: str = state.text.text
        counter = state.line_ctr
        states = parser_state.parse_conf.parse_table.states
        keywords = self.keywords
        pos, line, line_start = counter.char_pos, counter.line, counter.line_start_pos
        if pos == 0:
            line += self.line_offset  # a piece cut from a larger file keeps its line numbers
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                acceptable = set(states[parser_state.position])
                raise UnexpectedCharacters(
                    text, pos, line, pos - line_start + 1, allowed=acceptable, state=parser_state
                )
            kind, value, end = match.lastgroup, match.group(), match.end()
            column = pos - line_start + 1
            if kind == "WS":
                newlines = value.count("\n")
                if newlines:
                    line += newlines
                    line_start = pos + value.rindex("\n") + 1
            else:
                if kind == "NAME" or kind == "PUNCT":
                    keyword = keywords.get(value)
                    actions = states[parser_state.position]
                    if kind == "PUNCT" or (
                        keyword and (keyword in actions or "NAME" not in actions)
                    ):
                        kind = keyword or kind
                token = Token(kind, value, pos, line, column, line, column + len(value), end)
            counter.char_pos, counter.line, counter.line_start_pos = end, line, line_start
            counter.column = end - line_start + 1
            pos = end
            if kind == "COMMENT":
                self.comments.append(token)
            elif kind != "WS":
                yield token


class _Reduce:
    """Lark's embedded-transformer hook: each rule reduces straight to IR, no parse tree.

    Lark looks up one callback per rule name when it builds the parser; rules named `_x` have
    none, so Lark inlines them into their parent, and terminals (upper case) have none either.
    """

    to_ir: ToIR

    def __getattr__(self, rule: str) -> Any:
        if rule.startswith("_") or not rule.islower():
            raise AttributeError(rule)
        return lambda children: self.to_ir.reduce(rule, children)


_reduce = _Reduce()


@cache
def _lark() -> Lark:
    return Lark(
        GRAMMAR.read_text(),
        parser="lalr",
        lexer=_Lexer,
        keep_all_tokens=True,
        transformer=_reduce,
        cache=True,
    )


@cache
def _keywords() -> dict[str, str]:
    """Terminal name -> literal text, for the keywords and punctuation of the grammar."""
    return {t.name: t.pattern.value for t in _lark().terminals if isinstance(t.pattern, PatternStr)}


@contextmanager
def gc_paused() -> Iterator[None]:
    """Parsing allocates many small objects that are never cyclic garbage; without this pause
    Python's collector rescans the growing tree again and again and doubles the parse time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_document(text: str, path: str) -> tuple[ir.Document | None, list[Diagnostic]]:
    """Parse one file. Returns the document (None on syntax errors) and every diagnostic."""
    with gc_paused():
        return _parse_document(text, path)


def _parse_document(text: str, path: str) -> tuple[ir.Document | None, list[Diagnostic]]:
    try:
        statements, comments, diagnostics = _parse_piece(text, path, 0)
    except UnexpectedInput:
        return None, sorted(_recover(text, path), key=lambda d: d.span)
    if any(d.severity == "error" for d in diagnostics):
        return None, diagnostics
    return ir.Document(path, tuple(statements), tuple(comments)), diagnostics


def _parse_piece(
    text: str, path: str, line_offset: int, on_error=None
) -> tuple[list[ir.Statement], list[ir.Comment], list[Diagnostic]]:
    lark = _lark()
    lexer = lark.parser.lexer
    lexer.comments, lexer.line_offset = [], line_offset
    to_ir = _reduce.to_ir = ToIR(path)
    statements, _ = lark.parse(text, on_error=on_error)
    comments = [ir.Comment(str(t), to_ir.token_span(t)) for t in lexer.comments]
    return statements, comments, to_ir.diagnostics


class _SkipBadTokens:
    """Lark error handler: report an unexpected token, drop it and go on.

    Tokens dropped right after a reported one (only whitespace between them) are the same
    mistake and are not reported again.
    """

    def __init__(self, text: str, path: str, line_offset: int):
        self.text, self.path, self.line_offset = text, path, line_offset
        self.diagnostics: list[Diagnostic] = []
        self.last_end = -1

    def __call__(self, error: UnexpectedInput) -> bool:
        token = getattr(error, "token", None)
        if token is None or token.type == "$END":
            return False
        follows = self.last_end >= 0 and not self.text[self.last_end : token.start_pos].strip()
        if not follows:
            self.diagnostics.append(
                _syntax_diagnostic(error, self.text, self.path, self.line_offset)
            )
        self.last_end = token.end_pos
        return True


_STATEMENT_START = re.compile(
    r"^[ \t]*(?:" + "|".join(vocabulary.TOP_LEVEL_KEYWORDS) + r")\b", re.MULTILINE
)


def _recover(text: str, path: str) -> list[Diagnostic]:
    """Parse each top-level statement alone, skipping bad tokens, and report what went wrong."""
    starts = [m.start() for m in _STATEMENT_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    diagnostics: list[Diagnostic] = []
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        piece = text[begin:end]
        line_offset = text.count("\n", 0, begin)
        skipper = _SkipBadTokens(piece, path, line_offset)
        try:
            found = _parse_piece(piece, path, line_offset, on_error=skipper)[2]
        except UnexpectedInput as error:
            found = []
            if not (skipper.diagnostics and _at_end(error)):  # else: fallout of the first error
                found.append(_syntax_diagnostic(error, piece, path, line_offset))
        diagnostics += skipper.diagnostics + found
    return diagnostics


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


def _syntax_diagnostic(error: UnexpectedInput, text: str, path: str, offset: int) -> Diagnostic:
    line, column = error.line, error.column
    previous = _previous_word(text, error.pos_in_stream if error.pos_in_stream else len(text))
    if isinstance(error, UnexpectedCharacters):
        char = text[error.pos_in_stream]
        expected = _expected(error.allowed or set(), previous)
        span = ir.Span(path, line, column, line, column + 1)
        if char == '"':
            return Diagnostic(
                "error",
                "unterminated string",
                span,
                help="close the string with '\"' on the same line",
            )
        if char == "-" and text[error.pos_in_stream + 1 : error.pos_in_stream + 2].isdigit():
            return Diagnostic("error", "numbers here cannot be negative", span, expected)
        if char == "-":
            name = _word_around(text, error.pos_in_stream)
            return Diagnostic(
                "error",
                "unexpected character '-'",
                span,
                expected,
                help=f'a name with dashes must be quoted: "{name}"',
            )
        return Diagnostic("error", f"unexpected character {char!r}", span, expected)

    names = _acceptable(error)
    expected = _expected(names, previous)
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
    keywords = _keywords()
    help_text = None
    if "RBRACE" in names and str(token) in vocabulary.TOP_LEVEL_KEYWORDS:
        opener = _unclosed_brace(text[: token.start_pos])
        where = f" opened on line {opener[0] + offset}" if opener else ""
        help_text = f"the block{where} is not closed: add '}}' before this line"
    elif token.type == "NAME" or token.type in keywords:
        choices = [keywords[n] for n in names if n in keywords and keywords[n].isidentifier()]
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


def _expected(names: set[str], previous: str | None) -> str:
    keywords = _keywords()
    literals = {keywords[n] for n in names if n in keywords}
    parts: list[str] = []
    for required, absorbed, phrase in _FAMILIES:
        if required <= literals:
            parts.append(phrase)
            literals -= required | absorbed
    parts += [f"'{word}'" for word in sorted(literals, key=_keyword_order)]
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
    for number, line in enumerate(text.splitlines(), 1):
        code = re.sub(r'"(?:[^"\\\n]|\\.)*"|#.*', lambda m: " " * len(m.group()), line)
        for column, char in enumerate(code, 1):
            if char == "{":
                stack.append((number, column))
            elif char == "}" and stack:
                stack.pop()
    return stack[-1] if stack else None


# ---- tree to IR --------------------------------------------------------------------------------


def _unquote(token: str) -> str:
    r"""The text between the quotes; `\"` stands for a quote and `\\` for a backslash."""
    return re.sub(r"\\([\\\"])", r"\1", token[1:-1])


_VALUE_TOKENS = frozenset({"NAME", "NUMBER", "STRING", "REGEX"})


class ToIR:
    """The one transformer from Lark's tree to IR, checking every enumerated word on the way.

    Each rule method gets the span of everything the rule matched and the values of its
    children: IR nodes, or the NAME/NUMBER/STRING/REGEX tokens (keywords are dropped).
    Lark calls `reduce` as it parses, through `_Reduce`.
    """

    def __init__(self, path: str):
        self.path = path
        self.diagnostics: list[Diagnostic] = []

    def reduce(self, rule: str, children: list) -> tuple[Any, ir.Span | None]:
        """Build the IR of one rule from its children: tokens, or (value, span) of sub-rules."""
        values: list[Any] = []
        first = last = None  # tokens and spans both have line, column, end_line, end_column
        for child in children:
            if child.__class__ is Token:
                where = child
                if child.type in _VALUE_TOKENS:
                    values.append(child)
            else:
                value, where = child
                values.append(value)
            if where is not None:
                first = first or where
                last = where
        span = None
        if first is not None:
            span = ir.Span(self.path, first.line, first.column, last.end_line, last.end_column)
        return getattr(self, rule)(span or ir.NOWHERE, values), span

    # -- helpers --

    def token_span(self, token: Token) -> ir.Span:
        return ir.Span(self.path, token.line, token.column, token.end_line, token.end_column)

    def error(
        self, message: str, span: ir.Span, expected: str | None = None, help: str | None = None
    ):
        self.diagnostics.append(Diagnostic("error", message, span, expected, help))

    def word(self, token: Token, vocab: Vocabulary | None = None, what: str = "") -> ir.Word:
        text = str(token)
        if vocab is None:
            return ir.Word(text, self.token_span(token))
        canonical = vocab.canonical(text)
        if canonical is None:
            self.error(
                f"unknown {what} '{text}'",
                self.token_span(token),
                vocab.expected,
                did_you_mean(text, vocab.spellings),
            )
            canonical = text
        return ir.Word(canonical, self.token_span(token))

    def string(self, token: Token) -> ir.Word:
        return ir.Word(_unquote(str(token)), self.token_span(token))

    def num(self, token: Token, *, whole: bool = True) -> ir.Num:
        """A number as written: digits give an exact int, anything else a finite float."""
        text, span = str(token), self.token_span(token)
        if text.isdigit():
            return ir.Num(int(text), span)
        if whole:
            self.error(f"expected a whole number, got {text}", span)
            return ir.Num(0, span)
        value = float(text)
        if not math.isfinite(value):
            self.error(f"{text} is too large", span)
            return ir.Num(0, span)
        return ir.Num(value, span)

    def options(self, items: list[tuple[str, Any, ir.Span]], allowed: tuple[str, ...]) -> dict:
        """Collect (key, value, span) option items, reporting an option given twice."""
        seen: dict[str, Any] = {}
        first: dict[str, ir.Span] = {}
        for key, value, span in items:
            if key not in allowed:
                self.error(f"'{key}' is not allowed here", span, "one of: " + ", ".join(allowed))
            elif key in seen:
                self.diagnostics.append(
                    Diagnostic(
                        "error",
                        f"{key.replace('_', ' ')} given twice in one statement",
                        span,
                        help="keep one of them",
                        notes=(Note("first given here", first[key]),),
                    )
                )
            else:
                seen[key], first[key] = value, span
        return seen

    # -- top level --

    def start(self, span, children):
        return list(children)

    def version(self, span, children):
        return ir.Version(self.num(children[0]), span)

    def include(self, span, children):
        return ir.Include(self.string(children[0]), span)

    def python_entry(self, span, children):
        return "python"

    def hf_folder(self, span, children):
        return "hf"

    def exported_program(self, span, children):
        return "exported"

    def model(self, span, children):
        kind, path = children
        return ir.ModelSource(kind, self.string(path), span)

    def calibration(self, span, children):
        source, *items = children
        opts = self.options(items, ("samples", "holdout", "mode"))
        return ir.Calibration(self.string(source), **opts, span=span)

    def samples(self, span, children):
        return ("samples", self.num(children[0]), span)

    def holdout(self, span, children):
        return ("holdout", self.num(children[0]), span)

    def mode(self, span, children):
        word = self.word(children[0], vocabulary.CALIBRATION_MODE, "calibration mode")
        return ("mode", word, span)

    def evaluate(self, span, children):
        return ir.Evaluate(self.string(children[0]), span)

    def target(self, span, children):
        backend, *rest = children
        alias = None
        items: list = []
        for child in rest:
            if isinstance(child, ir.Word):
                alias = child
            else:
                items = child
        opts = self.options(items, ("device", "arch", "mcpu", "opset", "tune_trials"))
        backend_word = self.word(backend, vocabulary.BACKEND, "backend")
        return ir.Target(backend_word, alias, **opts, span=span)

    def target_alias(self, span, children):
        return self.word(children[0])

    def target_body(self, span, children):
        return list(children)

    def device(self, span, children):
        return ("device", self.word(children[0], vocabulary.ALL_DEVICES, "device"), span)

    def arch(self, span, children):
        return ("arch", self.word(children[0]), span)

    def mcpu(self, span, children):
        token = children[0]
        word = self.string(token) if token.type == "STRING" else self.word(token)
        return ("mcpu", word, span)

    def opset(self, span, children):
        return ("opset", self.num(children[0]), span)

    def tune(self, span, children):
        return ("tune_trials", self.num(children[0]), span)

    def defaults(self, span, children):
        return ir.Defaults(tuple(children), span)

    def layer(self, span, children):
        pattern, *settings = children
        return ir.LayerRule(pattern, tuple(settings), span)

    def tie(self, span, children):
        return ir.Tie(children[0], span)

    def glob(self, span, children):
        return ir.Pattern(_unquote(str(children[0])), False, span)

    def regex(self, span, children):
        return ir.Pattern(str(children[0])[3:-1], True, span)  # raw: `\"` is `"`

    # -- settings --

    def keep(self, span, children):
        return ir.Keep(span)

    def weight(self, span, children):
        name, *items = children
        fmt = self.word(name, vocabulary.WEIGHT_FORMAT, "weight format")
        return ir.Weight(fmt, self.weight_options(items), None, span)

    def weight_choose(self, span, children):
        candidates = tuple(c for c in children if isinstance(c, ir.Candidate))
        items = [c for c in children if not isinstance(c, ir.Candidate)]
        return ir.Weight(None, self.weight_options(items), candidates, span)

    def candidate(self, span, children):
        name, *items = children
        fmt = self.word(name, vocabulary.WEIGHT_FORMAT, "weight format")
        extras = [i for i in items if isinstance(i, ir.Sparsity | ir.LowRank)]
        items = [i for i in items if not isinstance(i, ir.Sparsity | ir.LowRank)]
        items += [("sparsity" if isinstance(e, ir.Sparsity) else "rank", e, e.span) for e in extras]
        opts = self.options(items, (*_WEIGHT_KEYS, "sparsity", "rank"))
        return ir.Candidate(
            fmt,
            ir.WeightOptions(**{k: v for k, v in opts.items() if k in _WEIGHT_KEYS}),
            opts.get("sparsity"),
            opts.get("rank"),
            span,
        )

    def keep_candidate(self, span, children):
        return ir.Candidate(None, span=span)

    def weight_options(self, items: list) -> ir.WeightOptions:
        return ir.WeightOptions(**self.options(items, _WEIGHT_KEYS))

    def tensor(self, span, children):
        return ("granularity", ir.Granularity("tensor", None, span), span)

    def channel(self, span, children):
        return ("granularity", ir.Granularity("channel", None, span), span)

    def token(self, span, children):
        return ("granularity", ir.Granularity("token", None, span), span)

    def group(self, span, children):
        size = self.num(children[0])
        return ("granularity", ir.Granularity("group", size, span), span)

    def symmetric(self, span, children):
        return ("symmetric", ir.Flag(True, span), span)

    def asymmetric(self, span, children):
        return ("symmetric", ir.Flag(False, span), span)

    def scale(self, span, children):
        word = self.word(children[0], vocabulary.SCALE_FORMAT, "scale format")
        return ("scale", word, span)

    def rounding(self, span, children):
        method, *items = children
        opts = self.options(items, ("damp", "actorder"))
        word = self.word(method, vocabulary.ROUNDING, "rounding method")
        return ("rounding", ir.Rounding(word, **opts, span=span), span)

    def damp(self, span, children):
        return ("damp", self.num(children[0], whole=False), span)

    def actorder(self, span, children):
        return ("actorder", ir.Flag(True, span), span)

    def search(self, span, children):
        targets = tuple(self.word(t, vocabulary.SEARCH, "search target") for t in children)
        for i, target in enumerate(targets):
            if target in targets[:i]:
                self.error(f"search target '{target.text}' given twice", target.span)
        return ("search", ir.Search(targets, span), span)

    def activation(self, span, children):
        name, *items = children
        fmt = self.word(name, vocabulary.ACTIVATION_FORMAT, "activation format")
        opts = self.options(items, ("granularity", "symmetric", "dynamic"))
        return ir.Activation(fmt, **opts, span=span)

    def activation_none(self, span, children):
        return ir.Activation(None, span=span)

    def static(self, span, children):
        return ("dynamic", ir.Flag(False, span), span)

    def dynamic(self, span, children):
        return ("dynamic", ir.Flag(True, span), span)

    def sparsity(self, span, children):
        pattern, *method = children
        word = (
            self.word(method[0], vocabulary.SPARSITY_METHOD, "sparsity method") if method else None
        )
        return ir.Sparsity(pattern, word, span)

    def sparsity_none(self, span, children):
        return ir.Sparsity(None, span=span)

    def sparsity_method(self, span, children):
        return children[0]

    def n_of_m(self, span, children):
        return ir.NofM(self.num(children[0]), self.num(children[1]), span)

    def percent(self, span, children):
        return ir.Ratio(self.num(children[0], whole=False), True, span)

    def ratio(self, span, children):
        return ir.Ratio(self.num(children[0], whole=False), False, span)

    def lowrank(self, span, children):
        rank, *items = children
        opts = self.options(items, ("method", "finetune_steps", "factors"))
        return ir.LowRank(self.num(rank), **opts, span=span)

    def lowrank_method(self, span, children):
        word = self.word(children[0], vocabulary.LOWRANK_METHOD, "low-rank method")
        return ("method", word, span)

    def finetune(self, span, children):
        return ("finetune_steps", self.num(children[0]), span)

    def factors(self, span, children):
        word = self.word(children[0], vocabulary.FACTOR_FORMAT, "factor format")
        return ("factors", word, span)

    def bias_correction(self, span, children):
        return ir.BiasCorrection(span)

    def compensate_none(self, span, children):
        return ir.CompensateNone(span)

    # -- budgets and allocation --

    def budget(self, span, children):
        return ir.Budget(tuple(children), span)

    def _limit(self, metric: ir.Metric, span, children) -> ir.Limit:
        value, *rest = children
        unit = next((self.word(c) for c in rest if isinstance(c, Token)), None)
        target = next((c for c in rest if isinstance(c, ir.Word)), None)
        return ir.Limit(metric, self.num(value, whole=False), unit, target, span)

    def weight_bits(self, span, children):
        return self._limit("weight_bits", span, children)

    def size(self, span, children):
        return self._limit("size", span, children)

    def bops(self, span, children):
        return self._limit("bops", span, children)

    def latency(self, span, children):
        return self._limit("latency", span, children)

    def limit_target(self, span, children):
        return self.word(children[0])

    def allocate(self, span, children):
        strategy, *items = children
        word = self.word(strategy, vocabulary.ALLOCATOR, "allocation strategy")
        opts = self.options(items, ("generations", "offspring", "seed", "fitness", "sensitivity"))
        return ir.Allocate(word, **opts, span=span)

    def generations(self, span, children):
        return ("generations", self.num(children[0]), span)

    def offspring(self, span, children):
        return ("offspring", self.num(children[0]), span)

    def seed(self, span, children):
        return ("seed", self.num(children[0]), span)

    def fitness(self, span, children):
        return ("fitness", self.word(children[0], vocabulary.FITNESS, "fitness"), span)

    def sensitivity(self, span, children):
        word = self.word(children[0], vocabulary.SENSITIVITY, "sensitivity measure")
        return ("sensitivity", word, span)


_WEIGHT_KEYS = ("granularity", "symmetric", "scale", "rounding", "search")
