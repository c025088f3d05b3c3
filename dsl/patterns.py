"""Layer-name patterns: globs and regexes, both matching the whole qualified name.

Glob syntax: `*` any text (dots included), `?` one character, `[0-2]` / `[!0]` a character class,
`{a,b}` alternation. For `tie`, what each `*` matched (or each regex capture group) names the
group a layer belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from re import _constants, _parser
from typing import Any

import regex as regex_engine  # type: ignore[import-untyped]

from qspec.dsl.ir import Pattern


@dataclass(frozen=True)
class PatternError(Exception):
    message: str
    offset: int  # index into the pattern text


def check_pattern(pattern: Pattern) -> None:
    """Raise PatternError if the pattern is malformed (cheaper than compiling a glob)."""
    if pattern.regex:
        _compile(pattern.text, True)
    else:
        glob_to_regex(pattern.text)


def compile_pattern(pattern: Pattern) -> re.Pattern[str]:
    """The regex a pattern stands for; raises PatternError pointing into the pattern."""
    return _compile(pattern.text, pattern.regex)


@cache
def _compile(text: str, regex: bool) -> re.Pattern[str]:
    source = text if regex else glob_to_regex(text)
    try:
        compiled = re.compile(source)
        if regex:
            _check_backtracking(_parser.parse(source))
    except re.error as error:
        if not regex:
            raise PatternError(f"invalid glob: {error.msg}", 0) from None
        raise PatternError(f"invalid regex: {error.msg}", error.pos or 0) from None
    except RecursionError:
        raise PatternError("the regex nests too deeply", 0) from None
    except OverflowError:  # a repeat count beyond what the engine holds: a{99999999999}
        raise PatternError("a repeat count in the regex is too large", 0) from None
    return compiled


# ---- patterns that backtrack exponentially ---------------------------------------------------
# Python's engine backtracks: `(a+)+$` takes seconds on a 30-character name that does not match
# and years on a 60-character one. That happens when a repeated part can split the same text in
# several ways: it holds a repeat of its own (or alternatives that start alike) and nothing in it
# marks where one round ends. `(\.\d+)*` is fine: each round starts with a '.' that `\d+` cannot
# take. Such patterns are refused when checked, before any layer name meets them.

_Items = Any  # re._parser's parse tree: a list of (opcode, argument) pairs
_REPEATS = (_constants.MAX_REPEAT, _constants.MIN_REPEAT)


def _check_backtracking(items: _Items) -> None:
    for op, av in items:
        if op in _REPEATS and av[1] > 1:
            hazards = _hazards(av[2])
            if (
                (_nullable(av[2]) and av[1] != _constants.MAXREPEAT)
                or _ambiguous_branch(av[2])
                or (
                    hazards
                    and not any(not _can_start(h, c) for c in _delimiters(av[2]) for h in hazards)
                )
            ):
                raise PatternError(
                    "this regex can take exponential time on a layer name it does not match: "
                    "a repeated group can split the same text in more than one way (a repeat "
                    "inside it with nothing marking where each round ends, alternatives that "
                    "start alike, or a round that can be empty)",
                    0,
                )
        for sub in _children(op, av):
            _check_backtracking(sub)


def _nullable(items: _Items) -> bool:
    """Whether the sequence can match the empty string: rounds of a counted repeat that can be
    empty split the text in as many ways as there are rounds, `(a?){25}` (an unbounded repeat
    stops at its first empty round)."""
    for op, av in items:
        if op in _REPEATS or op is _constants.POSSESSIVE_REPEAT:
            if av[0] > 0 and not _nullable(av[2]):
                return False
        elif op is _constants.BRANCH:
            if not any(_nullable(branch) for branch in av[1]):
                return False
        elif op is _constants.SUBPATTERN:
            if not _nullable(av[3]):
                return False
        elif op is _constants.ATOMIC_GROUP:
            if not _nullable(av):
                return False
        elif op not in (_constants.AT, _constants.ASSERT, _constants.ASSERT_NOT):
            return False  # a character, a class, a back reference: takes at least one
    return True


def _ambiguous_branch(items: _Items) -> bool:
    """Alternatives that match the same text whatever follows (two alike, or two that can be
    empty, as `(a|a)` parses: a prefix shared by every alternative is factored out): each round
    can go either way, whatever delimits the rounds."""
    for op, av in items:
        if op is _constants.BRANCH:
            branches = av[1]
            alike = any(a == b for i, a in enumerate(branches) for b in branches[i + 1 :])
            if alike or sum(map(_nullable, branches)) > 1:
                return True
        if op not in (_constants.ATOMIC_GROUP, _constants.POSSESSIVE_REPEAT) and any(
            _ambiguous_branch(sub) for sub in _children(op, av)
        ):
            return True
    return False


def _children(op: Any, av: Any) -> list[_Items]:
    """The sub-sequences of one node of the parse tree."""
    if op in _REPEATS or op is _constants.POSSESSIVE_REPEAT:
        return [av[2]]
    if op is _constants.SUBPATTERN:
        return [av[3]]
    if op is _constants.BRANCH:
        return list(av[1])
    if op is _constants.ATOMIC_GROUP:
        return [av]
    if op in (_constants.ASSERT, _constants.ASSERT_NOT):
        return [av[1]]
    if op is _constants.GROUPREF_EXISTS:
        return [av[1]] + ([av[2]] if av[2] else [])
    return []


def _hazards(items: _Items) -> list[_Items]:
    """The parts of a repeated sequence that can match in more than one way: inner repeats and
    alternatives whose first characters are not all distinct literals (atomic ones cannot)."""
    found: list[_Items] = []
    for op, av in items:
        if op in _REPEATS and av[1] > 1:
            found.append([(op, av)])
        elif op is _constants.BRANCH:
            firsts = [b[0] if b else None for b in av[1]]
            literal = all(f is not None and f[0] is _constants.LITERAL for f in firsts)
            if not literal or len({f[1] for f in firsts}) < len(firsts):  # type: ignore[index]
                found.append([(op, av)])
        if op is not _constants.ATOMIC_GROUP and op is not _constants.POSSESSIVE_REPEAT:
            for sub in _children(op, av):
                found += _hazards(sub)
    return found


def _delimiters(items: _Items) -> list[int]:
    """Characters every match of the sequence contains, outside any repeat or alternative."""
    found: list[int] = []
    for op, av in items:
        if op is _constants.LITERAL:
            found.append(av)
        elif op is _constants.SUBPATTERN:
            found += _delimiters(av[3])
    return found


def _can_start(items: _Items, char: int) -> bool:
    """Whether some character that `items` can match is `char` (True when unsure)."""
    text = chr(char)
    for op, av in items:
        if op is _constants.LITERAL:
            if av == char:
                return True
        elif op is _constants.NOT_LITERAL:
            if av != char:
                return True
        elif op is _constants.IN:
            if _in_class(av, text):
                return True
        elif op is _constants.AT:
            continue
        elif op in _REPEATS or op in (
            _constants.POSSESSIVE_REPEAT,
            _constants.SUBPATTERN,
            _constants.BRANCH,
            _constants.ATOMIC_GROUP,
        ):
            if any(_can_start(sub, char) for sub in _children(op, av)):
                return True
        else:  # ANY, back references, lookarounds: assume the worst
            return True
    return False


_CATEGORIES = {
    _constants.CATEGORY_DIGIT: r"\d",
    _constants.CATEGORY_NOT_DIGIT: r"\D",
    _constants.CATEGORY_WORD: r"\w",
    _constants.CATEGORY_NOT_WORD: r"\W",
    _constants.CATEGORY_SPACE: r"\s",
    _constants.CATEGORY_NOT_SPACE: r"\S",
}


def _in_class(members: Any, text: str) -> bool:
    """Whether the character class re._parser parsed into `members` matches `text`."""
    char, negate, hit = ord(text), False, False
    for op, av in members:
        if op is _constants.NEGATE:
            negate = True
        elif op is _constants.LITERAL:
            hit = hit or av == char
        elif op is _constants.RANGE:
            hit = hit or av[0] <= char <= av[1]
        elif op is _constants.CATEGORY and av in _CATEGORIES:
            hit = hit or re.fullmatch(_CATEGORIES[av], text) is not None
        else:
            return True
    return hit != negate


def glob_to_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if char == "*":
            out.append("(.*)")
        elif char == "?":
            out.append(".")
        elif char == "[":
            start = i + 1 + (glob[i + 1 : i + 2] == "!")
            end = glob.find("]", start + 1)  # a "]" right after "[" or "[!" is literal
            if end < 0:
                raise PatternError("'[' has no matching ']'", i)
            out.append(_character_class(glob[i + 1 : end], i))
            i = end
        elif char == "{":
            end = glob.find("}", i)
            if end < 0:
                raise PatternError("'{' has no matching '}'", i)
            inner = glob[i + 1 : end]
            if "{" in inner:
                raise PatternError("alternations cannot be nested", i + 1 + inner.index("{"))
            out.append("(?:" + "|".join(re.escape(a) for a in inner.split(",")) + ")")
            i = end
        elif char == "}":
            raise PatternError("'}' has no matching '{'", i)
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _character_class(body: str, offset: int) -> str:
    negate = body.startswith("!")
    members = body[negate:]
    escaped = "".join("\\" + c if c in "\\[]^" else c for c in members)
    regex = "[" + ("^" if negate else "") + escaped + "]"
    try:
        re.compile(regex)
    except re.error as error:
        raise PatternError(f"invalid character class: {error.msg}", offset) from None
    return regex


# The longest one layer name may take against one regex. The check above refuses the shapes
# known to backtrack exponentially; this bounds everything else (polynomial shapes such as
# `a*a*a*a*a*a*!`), so no pattern can hang a compile.
MATCH_SECONDS = 1.0


def fullmatch(pattern: Pattern, name: str) -> tuple[str | None, ...] | None:
    """The groups of `pattern` matching all of `name`, or None. Regexes run on the `regex`
    engine (the same syntax as `re`) under a time limit; globs translate to linear regexes."""
    if not pattern.regex:
        match = compile_pattern(pattern).fullmatch(name)
        return match.groups() if match else None
    compile_pattern(pattern)  # the checks (and errors) `re` gives
    try:
        found = _timed(pattern.text).fullmatch(name, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise PatternError(
            f"this regex took more than {MATCH_SECONDS:g} s on the layer name '{name}'", 0
        ) from None
    return found.groups() if found else None


@cache
def _timed(text: str) -> Any:
    return regex_engine.compile(text, flags=regex_engine.VERSION0)


def matches(pattern: Pattern, name: str) -> bool:
    return fullmatch(pattern, name) is not None


def tie_key(pattern: Pattern, name: str) -> tuple[str | None, ...] | None:
    """The group a layer joins under `tie pattern`: the text of each wildcard, or None."""
    return fullmatch(pattern, name)
