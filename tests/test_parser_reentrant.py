"""The parser is re-entrant: parses in many threads at once, or one started inside another,
give what each parse gives alone, because the parser keeps no state between parses."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import cycle
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from lark import Lark, UnexpectedInput
from lark.lexer import Lexer, LexerState

from qspec.dsl import parser, recovery
from qspec.dsl.parser import parse_document

ROOT = Path(__file__).resolve().parents[1]


def _commented(rules: int, broken: bool) -> str:
    """A spec with a comment on every rule; `broken` puts a syntax error in every third rule,
    so that recovery parses many pieces, skipping bad tokens in some."""
    lines = ["# header comment", "qspec 1", 'model "model.py:load"  # trailing comment']
    for i in range(rules):
        setting = "weight int4 group 32 @" if broken and i % 3 == 0 else "weight int8 channel"
        if broken and i % 3 == 1:
            setting = "weight int4 group"
        lines.append(f'# rule {i}\nlayer "model.layers.{i}.*" {{\n  {setting}  # why {i}\n}}')
    return "\n".join(lines) + "\n"


SPECS: dict[str, str] = {
    "commented.qspec": _commented(60, broken=False),
    "broken.qspec": _commented(60, broken=True),
    "words.qspec": 'qspec 1\nlayer "a" {\n  weight int44 group 32 round gptqq  # typos\n}\n',
    **{
        str(path.relative_to(ROOT)): path.read_text()
        for path in [
            *sorted(ROOT.glob("examples/*/*.qspec")),
            *sorted(ROOT.glob("tests/errors/*.qspec")),
        ]
    },
}
ALONE = {name: parse_document(text, name) for name, text in SPECS.items()}


def test_corpus_covers_comments_syntax_errors_and_word_errors():
    assert any(document and document.comments for document, _ in ALONE.values())
    assert len(ALONE["broken.qspec"][1]) >= 20  # one per broken rule: recovery ran piece by piece
    assert ALONE["words.qspec"][0] is None and len(ALONE["words.qspec"][1]) == 2


@contextmanager
def _switching_often() -> Iterator[None]:
    """Make threads switch every few bytecodes, so that parses really interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_parses_in_many_threads_give_what_each_gives_alone():
    """Mostly the two long files, whose parses are long enough to be cut by other threads."""
    others = cycle(sorted(set(SPECS) - {"commented.qspec", "broken.qspec"}))
    names = [
        ("commented.qspec", "broken.qspec")[i % 2] if i % 4 else next(others) for i in range(200)
    ]
    with _switching_often(), ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda name: parse_document(SPECS[name], name), names))
    for name, result in zip(names, results, strict=True):
        assert result == ALONE[name], name


def _syntax_error(text: str) -> bool:
    try:
        parser._parse(parser._grammar(), text, "probe.qspec")
    except UnexpectedInput:
        return True
    return False


BROKEN = sorted(name for name, text in SPECS.items() if _syntax_error(text))


def _parse_with(text: str, name: str, on_error: recovery.ErrorHandler) -> object:
    """Parse with `on_error` as Lark's error handler, returning what came out: the IR,
    comments and diagnostics, or where the error that ended the parse was."""
    try:
        return parser._parse(parser._grammar(), text, name, 0, on_error)
    except UnexpectedInput as error:
        return (type(error).__name__, error.line, error.column)


@settings(max_examples=30, deadline=None)
@given(outer=st.sampled_from(BROKEN), inner=st.sampled_from(sorted(SPECS)))
def test_a_parse_started_inside_another_leaves_both_intact(outer: str, inner: str):
    """Lark calls the error handler in the middle of a parse; one that parses another file
    there must not disturb the outer parse, nor be disturbed by it."""
    literals = parser._grammar().literals
    skip = recovery._SkipBadTokens(SPECS[outer], outer, 0, literals)
    alone = _parse_with(SPECS[outer], outer, skip)
    nested_skip = recovery._SkipBadTokens(SPECS[outer], outer, 0, literals)
    inner_results = []

    def parse_inside(error: UnexpectedInput) -> bool:
        inner_results.append(parse_document(SPECS[inner], inner))
        return nested_skip(error)

    assert _parse_with(SPECS[outer], outer, parse_inside) == alone
    assert nested_skip.diagnostics == skip.diagnostics
    assert inner_results and all(result == ALONE[inner] for result in inner_results)


def test_earlier_parses_leave_nothing_behind():
    """A parse after ones with comments and syntax errors gives what it gives first, and the
    modules and the shared grammar hold no state of a parse."""
    grammar = parser._grammar()
    snapshot = (dict(vars(grammar.lexer)), dict(grammar.inlined), dict(grammar.wrappers))
    first = parse_document(SPECS["commented.qspec"], "third.qspec")
    for name in ("broken.qspec", "commented.qspec", "words.qspec", "broken.qspec"):
        parse_document(SPECS[name], name)
    assert parse_document(SPECS["commented.qspec"], "third.qspec") == first
    assert (dict(vars(grammar.lexer)), dict(grammar.inlined), dict(grammar.wrappers)) == snapshot
    assert set(vars(grammar.lexer)) == {"keywords"}

    for module in (parser, recovery):
        held = [name for name, value in vars(module).items() if _parse_state(value)]
        assert not held, f"{module.__name__} holds {held}"


def _parse_state(value: object) -> bool:
    """Whether a module global could carry state from one parse to the next: an object of
    a class of the parser (lexer, callbacks, IR builder, error handler), Lark's parser, lexer
    or lexer state, or a growing collection."""
    own = type(value).__module__ in {parser.__name__, recovery.__name__}
    return own or isinstance(value, Lark | Lexer | LexerState | list | set)
