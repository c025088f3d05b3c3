"""Text to IR: the Lark parser, one Transformer into `ir` dataclasses, and syntax diagnostics.

A file parses in one pass. When it has syntax errors, it is cut into top-level statements
(each starts on a line whose first word is a top-level keyword) and each piece is parsed on its
own, so one run reports an error per broken statement and checks the words of the others.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, UnexpectedCharacters, UnexpectedInput, v_args
from lark.exceptions import UnexpectedEOF, VisitError
from lark.lexer import PatternStr

from qspec.dsl import ir, vocabulary
from qspec.dsl.diagnostics import Diagnostic, Note, did_you_mean, some_of
from qspec.dsl.vocabulary import Vocabulary

GRAMMAR = Path(__file__).with_name("qspec.lark")


class _CommentSink:
    """Lexer callback target: comments are not in the tree, the formatter needs them."""

    def __init__(self) -> None:
        self.tokens: list[Token] = []

    def __call__(self, token: Token) -> Token:
        self.tokens.append(token)
        return token


_comments = _CommentSink()


@cache
def _lark() -> Lark:
    return Lark(
        GRAMMAR.read_text(),
        parser="lalr",
        propagate_positions=True,
        lexer_callbacks={"COMMENT": _comments},
    )


@cache
def _keywords() -> dict[str, str]:
    """Terminal name -> literal text, for the keywords and punctuation of the grammar."""
    return {t.name: t.pattern.value for t in _lark().terminals if isinstance(t.pattern, PatternStr)}


def parse_document(text: str, path: str) -> tuple[ir.Document | None, list[Diagnostic]]:
    """Parse one file. Returns the document (None on syntax errors) and every diagnostic."""
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
    _comments.tokens = []
    tree = _lark().parse(text, on_error=on_error)
    to_ir = ToIR(path, line_offset)
    try:
        statements = to_ir.transform(tree)
    except VisitError as error:  # a bug in ToIR, not in the user's file
        raise error.orig_exc from error
    comments = [ir.Comment(str(t), to_ir.token_span(t)) for t in _comments.tokens]
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

# Families of keywords that are named as one phrase when a parser state expects all of them.
_FAMILIES = (
    (
        frozenset(vocabulary.TOP_LEVEL_KEYWORDS),
        "a statement (" + ", ".join(vocabulary.TOP_LEVEL_KEYWORDS) + ")",
    ),
    (
        frozenset({"weight", "activation", "sparsity", "compensate", "keep"}),
        "a setting (weight, activation, sparsity, compensate, keep)",
    ),
    (
        frozenset({"tensor", "channel", "group", "symmetric", "asymmetric", "scale", "round"}),
        "a weight option (tensor, channel, group N, symmetric, asymmetric, scale, round, search)",
    ),
    (
        frozenset({"device", "arch", "mcpu", "opset", "tune"}),
        "a target option (device, arch, mcpu, opset, tune trials N)",
    ),
    (frozenset({"lora", "bias", "none"}), "lora, bias or none"),
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
        span = ir.Span(path, line + offset, column, line + offset, column + 1)
        if char == '"':
            return Diagnostic(
                "error",
                "unterminated string",
                span,
                help="close the string with '\"' on the same line",
            )
        if char == "-":
            return Diagnostic("error", "numbers here cannot be negative", span, expected)
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
                expected,
                help="add '}' after the last line of the block",
            )
        return Diagnostic("error", "unexpected end of file", span, expected)

    span = ir.Span(
        path, token.line + offset, token.column, token.end_line + offset, token.end_column
    )
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
    for family, phrase in _FAMILIES:
        if family <= literals:
            parts.append(phrase)
            literals -= family
            if "search" in phrase:
                literals.discard("search")
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


@v_args(meta=True)
class ToIR(Transformer):
    """The one Transformer from Lark's tree to IR, checking every enumerated word on the way."""

    def __init__(self, path: str, line_offset: int = 0):
        super().__init__()
        self.path = path
        self.line_offset = line_offset
        self.diagnostics: list[Diagnostic] = []

    # -- helpers --

    def span(self, meta: Any) -> ir.Span:
        if getattr(meta, "empty", True):
            return ir.NOWHERE
        off = self.line_offset
        return ir.Span(
            self.path, meta.line + off, meta.column, meta.end_line + off, meta.end_column
        )

    def token_span(self, token: Token) -> ir.Span:
        off = self.line_offset
        return ir.Span(
            self.path, token.line + off, token.column, token.end_line + off, token.end_column
        )

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
        value = float(token)
        span = self.token_span(token)
        if whole:
            if not value.is_integer() or not re.fullmatch(r"[0-9]+", str(token)):
                self.error(f"expected a whole number, got {token}", span)
            return ir.Num(int(value), span)
        return ir.Num(int(value) if re.fullmatch(r"[0-9]+", str(token)) else value, span)

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

    def start(self, meta, children):
        return list(children)

    def version(self, meta, children):
        return ir.Version(self.num(children[0]), self.span(meta))

    def include(self, meta, children):
        return ir.Include(self.string(children[0]), self.span(meta))

    def python_entry(self, meta, children):
        return "python"

    def hf_folder(self, meta, children):
        return "hf"

    def exported_program(self, meta, children):
        return "exported"

    def model(self, meta, children):
        kind, path = children
        return ir.ModelSource(kind, self.string(path), self.span(meta))

    def calibration(self, meta, children):
        source, *items = children
        opts = self.options(items, ("samples", "holdout", "mode"))
        return ir.Calibration(self.string(source), **opts, span=self.span(meta))

    def samples(self, meta, children):
        return ("samples", self.num(children[0]), self.span(meta))

    def holdout(self, meta, children):
        return ("holdout", self.num(children[0]), self.span(meta))

    def mode(self, meta, children):
        word = self.word(children[0], vocabulary.CALIBRATION_MODE, "calibration mode")
        return ("mode", word, self.span(meta))

    def evaluate(self, meta, children):
        return ir.Evaluate(self.string(children[0]), self.span(meta))

    def target(self, meta, children):
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
        return ir.Target(backend_word, alias, **opts, span=self.span(meta))

    def target_alias(self, meta, children):
        return self.word(children[0])

    def target_body(self, meta, children):
        return list(children)

    def device(self, meta, children):
        return ("device", self.word(children[0], vocabulary.ALL_DEVICES, "device"), self.span(meta))

    def arch(self, meta, children):
        return ("arch", self.word(children[0]), self.span(meta))

    def mcpu(self, meta, children):
        return ("mcpu", self.word(children[0]), self.span(meta))

    def opset(self, meta, children):
        return ("opset", self.num(children[0]), self.span(meta))

    def tune(self, meta, children):
        return ("tune_trials", self.num(children[0]), self.span(meta))

    def defaults(self, meta, children):
        return ir.Defaults(tuple(children), self.span(meta))

    def layer(self, meta, children):
        pattern, *settings = children
        return ir.LayerRule(pattern, tuple(settings), self.span(meta))

    def tie(self, meta, children):
        return ir.Tie(children[0], self.span(meta))

    def glob(self, meta, children):
        return ir.Pattern(_unquote(str(children[0])), False, self.span(meta))

    def regex(self, meta, children):
        return ir.Pattern(str(children[0])[3:-1], True, self.span(meta))  # raw: `\"` is `"`

    # -- settings --

    def keep(self, meta, children):
        return ir.Keep(self.span(meta))

    def weight(self, meta, children):
        name, *items = children
        fmt = self.word(name, vocabulary.WEIGHT_FORMAT, "weight format")
        return ir.Weight(fmt, self.weight_options(items), None, self.span(meta))

    def weight_choose(self, meta, children):
        candidates = tuple(c for c in children if isinstance(c, ir.Candidate))
        items = [c for c in children if not isinstance(c, ir.Candidate)]
        return ir.Weight(None, self.weight_options(items), candidates, self.span(meta))

    def candidate(self, meta, children):
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
            self.span(meta),
        )

    def keep_candidate(self, meta, children):
        return ir.Candidate(None, span=self.span(meta))

    def weight_options(self, items: list) -> ir.WeightOptions:
        return ir.WeightOptions(**self.options(items, _WEIGHT_KEYS))

    def tensor(self, meta, children):
        return ("granularity", ir.Granularity("tensor", None, self.span(meta)), self.span(meta))

    def channel(self, meta, children):
        return ("granularity", ir.Granularity("channel", None, self.span(meta)), self.span(meta))

    def token(self, meta, children):
        return ("granularity", ir.Granularity("token", None, self.span(meta)), self.span(meta))

    def group(self, meta, children):
        size = self.num(children[0])
        return ("granularity", ir.Granularity("group", size, self.span(meta)), self.span(meta))

    def symmetric(self, meta, children):
        return ("symmetric", ir.Flag(True, self.span(meta)), self.span(meta))

    def asymmetric(self, meta, children):
        return ("symmetric", ir.Flag(False, self.span(meta)), self.span(meta))

    def scale(self, meta, children):
        word = self.word(children[0], vocabulary.SCALE_FORMAT, "scale format")
        return ("scale", word, self.span(meta))

    def rounding(self, meta, children):
        method, *items = children
        opts = self.options(items, ("damp", "actorder"))
        word = self.word(method, vocabulary.ROUNDING, "rounding method")
        return ("rounding", ir.Rounding(word, **opts, span=self.span(meta)), self.span(meta))

    def damp(self, meta, children):
        return ("damp", self.num(children[0], whole=False), self.span(meta))

    def actorder(self, meta, children):
        return ("actorder", ir.Flag(True, self.span(meta)), self.span(meta))

    def search(self, meta, children):
        targets = tuple(self.word(t, vocabulary.SEARCH, "search target") for t in children)
        for i, target in enumerate(targets):
            if target in targets[:i]:
                self.error(f"search target '{target.text}' given twice", target.span)
        return ("search", ir.Search(targets, self.span(meta)), self.span(meta))

    def activation(self, meta, children):
        name, *items = children
        fmt = self.word(name, vocabulary.ACTIVATION_FORMAT, "activation format")
        opts = self.options(items, ("granularity", "symmetric", "dynamic"))
        return ir.Activation(fmt, **opts, span=self.span(meta))

    def activation_none(self, meta, children):
        return ir.Activation(None, span=self.span(meta))

    def static(self, meta, children):
        return ("dynamic", ir.Flag(False, self.span(meta)), self.span(meta))

    def dynamic(self, meta, children):
        return ("dynamic", ir.Flag(True, self.span(meta)), self.span(meta))

    def sparsity(self, meta, children):
        pattern, *method = children
        word = (
            self.word(method[0], vocabulary.SPARSITY_METHOD, "sparsity method") if method else None
        )
        return ir.Sparsity(pattern, word, self.span(meta))

    def sparsity_none(self, meta, children):
        return ir.Sparsity(None, span=self.span(meta))

    def n_of_m(self, meta, children):
        return ir.NofM(self.num(children[0]), self.num(children[1]), self.span(meta))

    def percent(self, meta, children):
        return ir.Ratio(self.num(children[0], whole=False), True, self.span(meta))

    def ratio(self, meta, children):
        return ir.Ratio(self.num(children[0], whole=False), False, self.span(meta))

    def lowrank(self, meta, children):
        rank, *items = children
        opts = self.options(items, ("method", "finetune_steps", "factors"))
        return ir.LowRank(self.num(rank), **opts, span=self.span(meta))

    def lowrank_method(self, meta, children):
        word = self.word(children[0], vocabulary.LOWRANK_METHOD, "low-rank method")
        return ("method", word, self.span(meta))

    def finetune(self, meta, children):
        return ("finetune_steps", self.num(children[0]), self.span(meta))

    def factors(self, meta, children):
        word = self.word(children[0], vocabulary.FACTOR_FORMAT, "factor format")
        return ("factors", word, self.span(meta))

    def bias_correction(self, meta, children):
        return ir.BiasCorrection(self.span(meta))

    def compensate_none(self, meta, children):
        return ir.CompensateNone(self.span(meta))

    # -- budgets and allocation --

    def budget(self, meta, children):
        return ir.Budget(tuple(children), self.span(meta))

    def _limit(self, metric: ir.Metric, meta, children) -> ir.Limit:
        value, *rest = children
        unit = next((self.word(c) for c in rest if isinstance(c, Token)), None)
        target = next((c for c in rest if isinstance(c, ir.Word)), None)
        return ir.Limit(metric, self.num(value, whole=False), unit, target, self.span(meta))

    def weight_bits(self, meta, children):
        return self._limit("weight_bits", meta, children)

    def size(self, meta, children):
        return self._limit("size", meta, children)

    def bops(self, meta, children):
        return self._limit("bops", meta, children)

    def latency(self, meta, children):
        return self._limit("latency", meta, children)

    def limit_target(self, meta, children):
        return self.word(children[0])

    def allocate(self, meta, children):
        strategy, *items = children
        word = self.word(strategy, vocabulary.ALLOCATOR, "allocation strategy")
        opts = self.options(items, ("generations", "offspring", "seed", "fitness", "sensitivity"))
        return ir.Allocate(word, **opts, span=self.span(meta))

    def generations(self, meta, children):
        return ("generations", self.num(children[0]), self.span(meta))

    def offspring(self, meta, children):
        return ("offspring", self.num(children[0]), self.span(meta))

    def seed(self, meta, children):
        return ("seed", self.num(children[0]), self.span(meta))

    def fitness(self, meta, children):
        return ("fitness", self.word(children[0], vocabulary.FITNESS, "fitness"), self.span(meta))

    def sensitivity(self, meta, children):
        word = self.word(children[0], vocabulary.SENSITIVITY, "sensitivity measure")
        return ("sensitivity", word, self.span(meta))


_WEIGHT_KEYS = ("granularity", "symmetric", "scale", "rounding", "search")
