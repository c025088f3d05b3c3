"""Text to IR: the Lark grammar, a lexer, and the one Transformer into `ir` dataclasses.

Parsing is re-entrant: the compiled grammar is built once and never changed, and everything a
parse changes (the lexer's position and comments, the IR builder, Lark's callback table) is made
for that parse alone, so parses in several threads, or one started inside another, cannot mix.
A file with syntax errors is handed to `recovery`, which reports each broken statement.
"""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast

from lark import Lark, Token, Tree, UnexpectedCharacters, UnexpectedInput
from lark.grammar import Rule
from lark.lexer import Lexer, LexerState, LexerThread, LineCounter, PatternStr
from lark.parse_tree_builder import ParseTreeBuilder
from lark.parsers.lalr_analysis import ParseTableBase
from lark.parsers.lalr_parser import LALR_Parser, _Parser
from lark.utils import TextSlice

from qspec.dsl import ir, vocabulary
from qspec.dsl.diagnostics import Diagnostic, Note, did_you_mean
from qspec.dsl.recovery import ErrorHandler, recover
from qspec.dsl.vocabulary import Vocabulary

GRAMMAR = Path(__file__).with_name("qspec.lark")
MAX_DIGITS = 100


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


class _Scan(LexerState):
    """One parse's lexer state: Lark's position in the text, and the comments passed so far.

    Copies (Lark copies a state to probe what the parser accepts, never to lex) start with no
    comments.
    """

    __slots__ = ("comments",)

    def __init__(
        self,
        text: TextSlice[str],
        line_ctr: LineCounter | None = None,
        last_token: Token | None = None,
    ) -> None:
        super().__init__(text, line_ctr, last_token)
        self.comments: list[Token] = []


class _Lexer(Lexer):
    """One master regex instead of Lark's lexer: the language is small, specs can be large.

    A keyword is lexed as a NAME where the parser cannot take the keyword but takes a NAME
    (`fitness evaluate`), which is what Lark's contextual lexer would do. Comments go to the
    parse's `_Scan` for the formatter. The lexer holds only the keyword table, so the one
    instance Lark makes serves every parse.
    """

    __future_interface__ = 2

    def __init__(self, conf: Any) -> None:
        self.keywords = MappingProxyType(
            {t.pattern.value: t.name for t in conf.terminals if isinstance(t.pattern, PatternStr)}
        )

    def lex(self, state: LexerState, parser_state: Any) -> Iterator[Token]:
        scan = cast(_Scan, state)  # the state `_parse` made; Lark hands it through
        text: str = state.text.text
        counter = state.line_ctr
        states = parser_state.parse_conf.parse_table.states
        keywords = self.keywords
        pos, line, line_start = counter.char_pos, counter.line, counter.line_start_pos
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                acceptable = set(states[parser_state.position])
                raise UnexpectedCharacters(
                    text, pos, line, pos - line_start + 1, allowed=acceptable, state=parser_state
                )
            kind, value, end = match.lastgroup, match.group(), match.end()
            assert kind is not None  # every alternative of _TOKEN is a named group
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
                scan.comments.append(token)
            elif kind != "WS":
                yield token


_Callback = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class _Grammar:
    """The compiled grammar, shared by every parse and never changed once built."""

    lexer: _Lexer
    parse_table: ParseTableBase[Any]
    literals: Mapping[str, str]
    """Terminal name -> literal text, for the keywords and punctuation."""
    inlined: dict[Rule, _Callback]
    """Callbacks of the `_x` rules: they build trees that Lark inlines into the parent rule.
    A dict rather than a read-only view, since copying a dict is fast and each parse starts
    its callback table as a copy."""
    wrappers: Mapping[Rule, tuple[str, tuple[Callable[[_Callback], _Callback], ...]]]
    """Rule -> the `ToIR` method that reduces it, and Lark's wrappers around that method
    (inlining `_x` children, passing a `?rule`'s single child through)."""


def _reduces(name: str) -> bool:
    """Whether `ToIR` reduces the rule: rules named `_x` (Lark inlines them) do not."""
    return not name.startswith("_") and name.islower()


@cache
def _grammar() -> _Grammar:
    """Built once: the LALR table is the slow part (Lark also keeps it in a disk cache)."""
    lark = Lark(GRAMMAR.read_text(), parser="lalr", lexer=_Lexer, keep_all_tokens=True, cache=True)
    builder = ParseTreeBuilder(lark.rules, Tree, maybe_placeholders=lark.options.maybe_placeholders)
    trees = builder.create_callback()
    inlined: dict[Rule, _Callback] = {}
    wrappers: dict[Rule, tuple[str, tuple[Callable[[_Callback], _Callback], ...]]] = {}
    for rule, chain in builder.rule_builders:
        name = rule.alias or rule.options.template_source or rule.origin.name
        if _reduces(name):
            wrappers[rule] = (name, tuple(chain))
        else:
            inlined[rule] = trees[rule]
    return _Grammar(
        lexer=lark.parser.lexer,
        parse_table=lark.parser.parser._parse_table,
        literals=MappingProxyType(
            {t.name: t.pattern.value for t in lark.terminals if isinstance(t.pattern, PatternStr)}
        ),
        inlined=inlined,
        wrappers=MappingProxyType(wrappers),
    )


class _Callbacks(dict[Rule, _Callback]):
    """Lark's rule -> callback table for one parse: each rule reduces straight into that
    parse's `ToIR`, no parse tree.

    A rule's callback is made when the rule is first reduced, since a small file (or a piece
    in recovery) uses few rules. The shared `_x` callbacks are in from the start, which also
    keeps the table truthy (Lark calls no callbacks from an empty one).
    """

    def __init__(self, grammar: _Grammar, to_ir: ToIR) -> None:
        super().__init__(grammar.inlined)
        self.wrappers = grammar.wrappers
        self.reduce = to_ir.reduce

    def __missing__(self, rule: Rule) -> _Callback:
        name, wrappers = self.wrappers[rule]
        callback: _Callback = partial(self.reduce, name)
        for wrap in wrappers:
            callback = wrap(callback)
        self[rule] = callback
        return callback


class _Driver(LALR_Parser):
    """Lark's LALR driver, its `on_error` loop included, running the shared parse table with
    one parse's callbacks (Lark's own driver holds a single table of callbacks)."""

    def __init__(self, parse_table: ParseTableBase[Any], callbacks: _Callbacks) -> None:
        # no LALR_Parser.__init__: that one builds the parse table
        # (Lark annotates the callback table as keyed by str; its keys are Rules)
        self.parser = _Parser(parse_table, callbacks)  # type: ignore[arg-type]


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


def normalize(text: str) -> str:
    """The text as the lexer reads it: without a leading UTF-8 byte-order mark (editors on
    Windows write one), and with CRLF and lone CR line ends as LF (else a comment would run to
    the end of a file with CR line ends, hiding everything after it)."""
    text = text.removeprefix("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def parse_document(text: str, path: str) -> tuple[ir.Document | None, list[Diagnostic]]:
    """Parse one file. Returns the document (None on syntax errors) and every diagnostic."""
    with gc_paused():
        return _parse_document(normalize(text), path)


def _parse_document(text: str, path: str) -> tuple[ir.Document | None, list[Diagnostic]]:
    grammar = _grammar()
    try:
        statements, comments, diagnostics = _parse(grammar, text, path)
    except UnexpectedInput:

        def parse_piece(piece: str, line_offset: int, on_error: ErrorHandler) -> list[Diagnostic]:
            return _parse(grammar, piece, path, line_offset, on_error)[2]

        return None, recover(text, path, parse_piece, grammar.literals)
    if any(d.severity == "error" for d in diagnostics):
        return None, diagnostics
    return ir.Document(path, tuple(statements), tuple(comments)), diagnostics


def _parse(
    grammar: _Grammar,
    text: str,
    path: str,
    line_offset: int = 0,
    on_error: ErrorHandler | None = None,
) -> tuple[list[ir.Statement], list[ir.Comment], list[Diagnostic]]:
    """Parse `text`, whose first line is line `line_offset + 1` of the file, with objects of
    its own: the lexer state, the IR builder and the callback table."""
    counter = LineCounter("\n")
    counter.line += line_offset
    scan = _Scan(TextSlice.cast_from(text), counter)
    to_ir = ToIR(path)
    driver = _Driver(grammar.parse_table, _Callbacks(grammar, to_ir))
    # LALR_Parser.parse is unannotated (untyped_calls_exclude misses it: the receiver is ours)
    statements, _ = driver.parse(LexerThread(grammar.lexer, scan), "start", on_error)  # type: ignore[no-untyped-call]
    comments = [ir.Comment(str(t), to_ir.token_span(t)) for t in scan.comments]
    return statements, comments, to_ir.diagnostics


# ---- tree to IR --------------------------------------------------------------------------------


def _unquote(token: str) -> str:
    r"""The text between the quotes; `\"` stands for a quote and `\\` for a backslash."""
    return re.sub(r"\\([\\\"])", r"\1", token[1:-1])


_VALUE_TOKENS = frozenset({"NAME", "NUMBER", "STRING", "REGEX"})

_T = TypeVar("_T")
_Option = tuple[str, _T, ir.Span]
"""An option item of a statement: (its key, its value, the span of the option)."""


class ToIR:
    """The one transformer from Lark's tree to IR, checking every enumerated word on the way.

    Each rule method gets the span of everything the rule matched and the values of its
    children: IR nodes, or the NAME/NUMBER/STRING/REGEX tokens (keywords are dropped).
    Lark calls `reduce` as it parses, through the parse's `_Callbacks`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.diagnostics: list[Diagnostic] = []

    def reduce(self, rule: str, children: list[Any]) -> tuple[Any, ir.Span | None]:
        """Build the IR of one rule from its children: tokens, or (value, span) of sub-rules."""
        values: list[Any] = []
        # tokens and spans both have line, column, end_line, end_column
        first: Token | ir.Span | None = None
        last: Token | ir.Span | None = None
        where: Token | ir.Span | None
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
        if first is not None and last is not None:
            # Lark types a token's position as optional; `_Lexer` sets it on every token
            span = ir.Span(self.path, first.line, first.column, last.end_line, last.end_column)  # type: ignore[arg-type]
        return getattr(self, rule)(span or ir.NOWHERE, values), span

    # -- helpers --

    def token_span(self, token: Token) -> ir.Span:
        # Lark types a token's position as optional; `_Lexer` sets it on every token
        return ir.Span(self.path, token.line, token.column, token.end_line, token.end_column)  # type: ignore[arg-type]

    def error(
        self, message: str, span: ir.Span, expected: str | None = None, help: str | None = None
    ) -> None:
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
        if len(text) > MAX_DIGITS:  # no setting takes such a number; int() would refuse it
            self.error(f"{text[:12]}... is too large ({len(text)} digits)", span)
            return ir.Num(0, span)
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

    def options(self, items: list[_Option[Any]], allowed: tuple[str, ...]) -> dict[str, Any]:
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

    def start(self, span: ir.Span, children: list[Any]) -> list[ir.Statement]:
        return list(children)

    def version(self, span: ir.Span, children: list[Any]) -> ir.Version:
        return ir.Version(self.num(children[0]), span)

    def include(self, span: ir.Span, children: list[Any]) -> ir.Include:
        return ir.Include(self.string(children[0]), span)

    def python_entry(self, span: ir.Span, children: list[Any]) -> ir.ModelKind:
        return "python"

    def hf_folder(self, span: ir.Span, children: list[Any]) -> ir.ModelKind:
        return "hf"

    def exported_program(self, span: ir.Span, children: list[Any]) -> ir.ModelKind:
        return "exported"

    def model(self, span: ir.Span, children: list[Any]) -> ir.ModelSource:
        kind, path = children
        return ir.ModelSource(kind, self.string(path), span)

    def calibration(self, span: ir.Span, children: list[Any]) -> ir.Calibration:
        sources = tuple(c for c in children if isinstance(c, ir.DataSource))
        items = [c for c in children if not isinstance(c, ir.DataSource)]
        opts = self.options(items, ("samples", "holdout", "mode"))
        return ir.Calibration(sources, **opts, span=span)

    def data_source(self, span: ir.Span, children: list[Any]) -> ir.DataSource:
        path, *weight = children
        value = self.num(weight[0], whole=False) if weight else None
        return ir.DataSource(self.string(path), value, span)

    def verify(self, span: ir.Span, children: list[Any]) -> ir.Verify:
        source, *samples = children
        return ir.Verify(self.string(source), self.num(samples[0]) if samples else None, span)

    def samples(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("samples", self.num(children[0]), span)

    def holdout(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("holdout", self.num(children[0]), span)

    def mode(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        word = self.word(children[0], vocabulary.CALIBRATION_MODE, "calibration mode")
        return ("mode", word, span)

    def evaluate(self, span: ir.Span, children: list[Any]) -> ir.Evaluate:
        return ir.Evaluate(self.string(children[0]), span)

    def target(self, span: ir.Span, children: list[Any]) -> ir.Target:
        backend, *rest = children
        alias = None
        items: list[_Option[Any]] = []
        for child in rest:
            if isinstance(child, ir.Word):
                alias = child
            else:
                items = child
        opts = self.options(items, ("device", "arch", "mcpu", "opset", "tune_trials"))
        backend_word = self.word(backend, vocabulary.BACKEND, "backend")
        return ir.Target(backend_word, alias, **opts, span=span)

    def target_alias(self, span: ir.Span, children: list[Any]) -> ir.Word:
        return self.word(children[0])

    def target_body(self, span: ir.Span, children: list[Any]) -> list[_Option[Any]]:
        return list(children)

    def device(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        return ("device", self.word(children[0], vocabulary.ALL_DEVICES, "device"), span)

    def arch(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        return ("arch", self.word(children[0]), span)

    def mcpu(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        token = children[0]
        word = self.string(token) if token.type == "STRING" else self.word(token)
        return ("mcpu", word, span)

    def opset(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("opset", self.num(children[0]), span)

    def tune(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("tune_trials", self.num(children[0]), span)

    def defaults(self, span: ir.Span, children: list[Any]) -> ir.Defaults:
        return ir.Defaults(tuple(children), span)

    def layer(self, span: ir.Span, children: list[Any]) -> ir.LayerRule:
        pattern, *settings = children
        return ir.LayerRule(pattern, tuple(settings), span)

    def tie(self, span: ir.Span, children: list[Any]) -> ir.Tie:
        return ir.Tie(children[0], span)

    def glob(self, span: ir.Span, children: list[Any]) -> ir.Pattern:
        return ir.Pattern(_unquote(str(children[0])), False, span)

    def regex(self, span: ir.Span, children: list[Any]) -> ir.Pattern:
        return ir.Pattern(str(children[0])[3:-1], True, span)  # raw: `\"` is `"`

    # -- settings --

    def keep(self, span: ir.Span, children: list[Any]) -> ir.Keep:
        return ir.Keep(span)

    def weight(self, span: ir.Span, children: list[Any]) -> ir.Weight:
        name, *items = children
        fmt = self.word(name, vocabulary.WEIGHT_FORMAT, "weight format")
        return ir.Weight(fmt, self.weight_options(items), None, span)

    def weight_choose(self, span: ir.Span, children: list[Any]) -> ir.Weight:
        candidates = tuple(c for c in children if isinstance(c, ir.Candidate))
        items = [c for c in children if not isinstance(c, ir.Candidate)]
        return ir.Weight(None, self.weight_options(items), candidates, span)

    def candidate(self, span: ir.Span, children: list[Any]) -> ir.Candidate:
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

    def keep_candidate(self, span: ir.Span, children: list[Any]) -> ir.Candidate:
        return ir.Candidate(None, span=span)

    def weight_options(self, items: list[_Option[Any]]) -> ir.WeightOptions:
        return ir.WeightOptions(**self.options(items, _WEIGHT_KEYS))

    def tensor(self, span: ir.Span, children: list[Any]) -> _Option[ir.Granularity]:
        return ("granularity", ir.Granularity("tensor", None, span), span)

    def channel(self, span: ir.Span, children: list[Any]) -> _Option[ir.Granularity]:
        return ("granularity", ir.Granularity("channel", None, span), span)

    def token(self, span: ir.Span, children: list[Any]) -> _Option[ir.Granularity]:
        return ("granularity", ir.Granularity("token", None, span), span)

    def group(self, span: ir.Span, children: list[Any]) -> _Option[ir.Granularity]:
        size = self.num(children[0])
        return ("granularity", ir.Granularity("group", size, span), span)

    def symmetric(self, span: ir.Span, children: list[Any]) -> _Option[ir.Flag]:
        return ("symmetric", ir.Flag(True, span), span)

    def asymmetric(self, span: ir.Span, children: list[Any]) -> _Option[ir.Flag]:
        return ("symmetric", ir.Flag(False, span), span)

    def scale(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        word = self.word(children[0], vocabulary.SCALE_FORMAT, "scale format")
        return ("scale", word, span)

    def rounding(self, span: ir.Span, children: list[Any]) -> _Option[ir.Rounding]:
        method, *items = children
        opts = self.options(items, ("damp", "actorder"))
        word = self.word(method, vocabulary.ROUNDING, "rounding method")
        return ("rounding", ir.Rounding(word, **opts, span=span), span)

    def damp(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("damp", self.num(children[0], whole=False), span)

    def actorder(self, span: ir.Span, children: list[Any]) -> _Option[ir.Flag]:
        return ("actorder", ir.Flag(True, span), span)

    def search(self, span: ir.Span, children: list[Any]) -> _Option[ir.Search]:
        targets = tuple(self.word(t, vocabulary.SEARCH, "search target") for t in children)
        for i, target in enumerate(targets):
            if target in targets[:i]:
                self.error(f"search target '{target.text}' given twice", target.span)
        return ("search", ir.Search(targets, span), span)

    def activation(self, span: ir.Span, children: list[Any]) -> ir.Activation:
        name, *items = children
        fmt = self.word(name, vocabulary.ACTIVATION_FORMAT, "activation format")
        opts = self.options(items, ("granularity", "symmetric", "dynamic", "calibrate"))
        return ir.Activation(fmt, **opts, span=span)

    def calibrate(self, span: ir.Span, children: list[Any]) -> _Option[ir.Calibrate]:
        method, *value = children
        word = self.word(method, vocabulary.CALIBRATE, "calibration method")
        number = self.num(value[0], whole=False) if value else None
        return ("calibrate", ir.Calibrate(word, number, span), span)

    def activation_none(self, span: ir.Span, children: list[Any]) -> ir.Activation:
        return ir.Activation(None, span=span)

    def static(self, span: ir.Span, children: list[Any]) -> _Option[ir.Flag]:
        return ("dynamic", ir.Flag(False, span), span)

    def dynamic(self, span: ir.Span, children: list[Any]) -> _Option[ir.Flag]:
        return ("dynamic", ir.Flag(True, span), span)

    def sparsity(self, span: ir.Span, children: list[Any]) -> ir.Sparsity:
        pattern, *method = children
        word = (
            self.word(method[0], vocabulary.SPARSITY_METHOD, "sparsity method") if method else None
        )
        return ir.Sparsity(pattern, word, span)

    def sparsity_none(self, span: ir.Span, children: list[Any]) -> ir.Sparsity:
        return ir.Sparsity(None, span=span)

    def sparsity_method(self, span: ir.Span, children: list[Any]) -> Token:
        method: Token = children[0]
        return method

    def n_of_m(self, span: ir.Span, children: list[Any]) -> ir.NofM:
        return ir.NofM(self.num(children[0]), self.num(children[1]), span)

    def percent(self, span: ir.Span, children: list[Any]) -> ir.Ratio:
        return ir.Ratio(self.num(children[0], whole=False), True, span)

    def ratio(self, span: ir.Span, children: list[Any]) -> ir.Ratio:
        return ir.Ratio(self.num(children[0], whole=False), False, span)

    def lowrank(self, span: ir.Span, children: list[Any]) -> ir.LowRank:
        rank, *items = children
        opts = self.options(items, ("method", "finetune_steps", "factors"))
        return ir.LowRank(self.num(rank), **opts, span=span)

    def lowrank_method(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        word = self.word(children[0], vocabulary.LOWRANK_METHOD, "low-rank method")
        return ("method", word, span)

    def finetune(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("finetune_steps", self.num(children[0]), span)

    def factors(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        word = self.word(children[0], vocabulary.FACTOR_FORMAT, "factor format")
        return ("factors", word, span)

    def bias_correction(self, span: ir.Span, children: list[Any]) -> ir.BiasCorrection:
        return ir.BiasCorrection(span)

    def compensate_none(self, span: ir.Span, children: list[Any]) -> ir.CompensateNone:
        return ir.CompensateNone(span)

    # -- budgets and allocation --

    def budget(self, span: ir.Span, children: list[Any]) -> ir.Budget:
        return ir.Budget(tuple(children), span)

    def _limit(self, metric: ir.Metric, span: ir.Span, children: list[Any]) -> ir.Limit:
        value, *rest = children
        unit = next((self.word(c) for c in rest if isinstance(c, Token)), None)
        target = next((c for c in rest if isinstance(c, ir.Word)), None)
        return ir.Limit(metric, self.num(value, whole=False), unit, target, span)

    def weight_bits(self, span: ir.Span, children: list[Any]) -> ir.Limit:
        return self._limit("weight_bits", span, children)

    def size(self, span: ir.Span, children: list[Any]) -> ir.Limit:
        return self._limit("size", span, children)

    def bops(self, span: ir.Span, children: list[Any]) -> ir.Limit:
        return self._limit("bops", span, children)

    def latency(self, span: ir.Span, children: list[Any]) -> ir.Limit:
        return self._limit("latency", span, children)

    def limit_target(self, span: ir.Span, children: list[Any]) -> ir.Word:
        return self.word(children[0])

    def allocate(self, span: ir.Span, children: list[Any]) -> ir.Allocate:
        strategy, *items = children
        word = self.word(strategy, vocabulary.ALLOCATOR, "allocation strategy")
        opts = self.options(items, ("generations", "offspring", "seed", "fitness", "sensitivity"))
        return ir.Allocate(word, **opts, span=span)

    def generations(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("generations", self.num(children[0]), span)

    def offspring(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("offspring", self.num(children[0]), span)

    def seed(self, span: ir.Span, children: list[Any]) -> _Option[ir.Num]:
        return ("seed", self.num(children[0]), span)

    def fitness(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        return ("fitness", self.word(children[0], vocabulary.FITNESS, "fitness"), span)

    def sensitivity(self, span: ir.Span, children: list[Any]) -> _Option[ir.Word]:
        word = self.word(children[0], vocabulary.SENSITIVITY, "sensitivity measure")
        return ("sensitivity", word, span)


_WEIGHT_KEYS = ("granularity", "symmetric", "scale", "rounding", "search")
