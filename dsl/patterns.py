"""Layer-name patterns: globs and regexes, both matching the whole qualified name.

Glob syntax: `*` any text (dots included), `?` one character, `[0-2]` / `[!0]` a character class,
`{a,b}` alternation. For `tie`, what each `*` matched (or each regex capture group) names the
group a layer belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

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
        return re.compile(source)
    except re.error as error:
        if not regex:
            raise PatternError(f"invalid glob: {error.msg}", 0) from None
        raise PatternError(f"invalid regex: {error.msg}", error.pos or 0) from None


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


def matches(pattern: Pattern, name: str) -> bool:
    return compile_pattern(pattern).fullmatch(name) is not None


def tie_key(pattern: Pattern, name: str) -> tuple[str | None, ...] | None:
    """The group a layer joins under `tie pattern`: the text of each wildcard, or None."""
    match = compile_pattern(pattern).fullmatch(name)
    return match.groups() if match else None
