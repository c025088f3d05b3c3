"""Property tests: IR -> format -> parse gives the same IR, formatting is idempotent, and
comments survive formatting.

The generator builds *syntactically* valid documents from the dataclasses of `qspec.dsl.ir`:
every enumerated word is a canonical word of the vocabulary, but combinations need not make
sense (`parse_document` checks words only; `validate.check` is not applied here).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qspec.dsl import ir, vocabulary
from qspec.dsl.format import format_document
from qspec.dsl.parser import parse_document

PATH = "roundtrip.qspec"

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- leaves ------------------------------------------------------------------------------------


def words(vocab: vocabulary.Vocabulary) -> st.SearchStrategy[ir.Word]:
    """Canonical words of a vocabulary only: aliases are normalised by the parser."""
    return st.sampled_from(vocab.words).map(ir.Word)


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


# Whole numbers: small ones most of the time, large ones now and then. Numbers beyond 2**53
# (where float64 stops being exact) have their own test below, so that a failure there does not
# hide everything else these properties could find.
whole = st.integers(min_value=0, max_value=512) | st.integers(min_value=0, max_value=2**53)
whole_num = whole.map(ir.Num)

# Slots that take a fraction (damp, ratio, budget values): floats or whole numbers, never
# negative, never inf/nan (the language has no spelling for them).
fraction = (
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False).filter(
        lambda x: not str(x).startswith("-")
    )
    | st.floats(min_value=0.0, max_value=1.0, allow_subnormal=False)
    | st.integers(min_value=0, max_value=10_000)
)
fraction_num = fraction.map(ir.Num)

# Text of a quoted string: anything but newlines and control characters, with the characters
# that need escaping or that mean something outside a string drawn often.
_string_chars = st.sampled_from('"\\#{}[],:% *?.') | st.characters(
    blacklist_categories=("Cc", "Cs")
)
string_text = st.text(_string_chars, max_size=24)
string_word = string_text.map(ir.Word)

# A regex is written raw between re" and ": no quote, and no odd run of trailing backslashes
# (it would escape the closing quote).
_regex_chars = st.sampled_from("\\.*+?()[]{}|^$ #,:") | st.characters(
    blacklist_categories=("Cc", "Cs"), blacklist_characters='"'
)


def _closes(text: str) -> bool:
    return (len(text) - len(text.rstrip("\\"))) % 2 == 0


regex_text = st.text(_regex_chars, max_size=24).filter(_closes)

# Free-form NAMEs (target alias, arch, mcpu, budget target). Keywords of the language are
# included on purpose: in these positions only a NAME is acceptable.
KEYWORDS = [
    *("qspec", "include", "model", "calibration", "verify", "evaluate", "target", "defaults"),
    "layer",
    *("tie", "budget", "allocate", "weight", "activation", "sparsity", "compensate", "keep"),
    *("choose", "device", "as", "on", "by", "rank", "none", "re"),
]
name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True) | st.sampled_from(KEYWORDS)
name_word = name.map(ir.Word)

pattern = st.one_of(
    string_text.map(lambda t: ir.Pattern(t, False)),
    regex_text.map(lambda t: ir.Pattern(t, True)),
)

# ---- settings ----------------------------------------------------------------------------------

granularity = st.one_of(
    st.sampled_from(["tensor", "channel", "token"]).map(ir.Granularity),
    whole_num.map(lambda n: ir.Granularity("group", n)),
)
flag = st.booleans().map(ir.Flag)

rounding = st.builds(
    ir.Rounding,
    method=words(vocabulary.ROUNDING),
    damp=optional(fraction_num),
    actorder=optional(st.just(ir.Flag(True))),  # `actorder` is a keyword with no negation
)

search = st.permutations(vocabulary.SEARCH.words).flatmap(
    lambda targets: st.integers(1, len(targets)).map(
        lambda n: ir.Search(tuple(ir.Word(t) for t in targets[:n]))
    )
)

weight_options = st.builds(
    ir.WeightOptions,
    granularity=optional(granularity),
    symmetric=optional(flag),
    scale=optional(words(vocabulary.SCALE_FORMAT)),
    rounding=optional(rounding),
    search=optional(search),
)

sparsity_pattern = st.one_of(
    st.builds(ir.NofM, whole_num, whole_num),
    st.builds(ir.Ratio, fraction_num, st.booleans()),
)
sparsity_method = optional(words(vocabulary.SPARSITY_METHOD))
sparsity = st.one_of(
    st.builds(ir.Sparsity, sparsity_pattern, sparsity_method),
    st.just(ir.Sparsity(None)),
)

lowrank = st.builds(
    ir.LowRank,
    rank=whole_num,
    method=optional(words(vocabulary.LOWRANK_METHOD)),
    finetune_steps=optional(whole_num),
    factors=optional(words(vocabulary.FACTOR_FORMAT)),
)

candidate = st.one_of(
    st.just(ir.Candidate(None)),  # keep
    st.builds(
        ir.Candidate,
        format=words(vocabulary.WEIGHT_FORMAT),
        options=weight_options,
        # a candidate's sparsity is a pattern (there is no `sparsity none` inside choose)
        sparsity=optional(st.builds(ir.Sparsity, sparsity_pattern, sparsity_method)),
        lowrank=optional(lowrank),
    ),
)

weight = st.one_of(
    st.builds(ir.Weight, format=words(vocabulary.WEIGHT_FORMAT), options=weight_options),
    st.builds(
        lambda candidates, options: ir.Weight(None, options, tuple(candidates)),
        st.lists(candidate, min_size=1, max_size=6),
        weight_options,
    ),
)

activation = st.one_of(
    st.just(ir.Activation(None)),
    st.builds(
        ir.Activation,
        format=words(vocabulary.ACTIVATION_FORMAT),
        granularity=optional(granularity),
        symmetric=optional(flag),
        dynamic=optional(flag),
    ),
)

setting = st.one_of(
    weight,
    activation,
    sparsity,
    lowrank,
    st.just(ir.BiasCorrection()),
    st.just(ir.CompensateNone()),
    st.just(ir.Keep()),
)
setting_list = st.lists(setting, max_size=5).map(tuple)

# ---- statements --------------------------------------------------------------------------------


@st.composite
def limit(draw) -> ir.Limit:
    metric = draw(st.sampled_from(list(ir.UNITS)))
    units = sorted(ir.UNITS[metric])
    unit = draw(optional(st.sampled_from(units).map(ir.Word))) if units else None
    target = draw(optional(name_word)) if metric == "latency" else None
    return ir.Limit(metric, draw(fraction_num), unit, target)


statement = st.one_of(
    string_word.map(ir.Include),
    st.builds(ir.ModelSource, st.sampled_from(["python", "hf", "exported"]), string_word),
    st.builds(
        ir.Calibration,
        sources=st.lists(
            st.builds(ir.DataSource, string_word, optional(fraction_num)), min_size=1, max_size=3
        ).map(tuple),
        samples=optional(whole_num),
        holdout=optional(whole_num),
        mode=optional(words(vocabulary.CALIBRATION_MODE)),
    ),
    string_word.map(ir.Evaluate),
    st.builds(ir.Verify, string_word, optional(whole_num)),
    st.builds(
        ir.Target,
        backend=words(vocabulary.BACKEND),
        alias=optional(name_word),
        device=optional(words(vocabulary.ALL_DEVICES)),
        arch=optional(name_word),
        mcpu=optional(name_word),
        opset=optional(whole_num),
        tune_trials=optional(whole_num),
    ),
    setting_list.map(ir.Defaults),
    st.builds(ir.LayerRule, pattern, setting_list),
    pattern.map(ir.Tie),
    st.lists(limit(), max_size=5).map(lambda limits: ir.Budget(tuple(limits))),
    st.builds(
        ir.Allocate,
        strategy=words(vocabulary.ALLOCATOR),
        generations=optional(whole_num),
        offspring=optional(whole_num),
        seed=optional(whole_num),
        fitness=optional(words(vocabulary.FITNESS)),
        sensitivity=optional(words(vocabulary.SENSITIVITY)),
    ),
)

documents = st.builds(
    lambda version, rest: ir.Document(PATH, (ir.Version(version), *rest)),
    whole_num,
    st.lists(statement, max_size=10),
)

# ---- helpers -----------------------------------------------------------------------------------


def parse_ok(text: str) -> ir.Document:
    document, diagnostics = parse_document(text, PATH)
    errors = [d for d in diagnostics if d.severity == "error"]
    rendered = "\n".join(d.render({PATH: text}) for d in errors)
    assert not errors, f"formatted text does not parse:\n{text}\n{rendered}"
    assert document is not None
    return document


# ---- properties --------------------------------------------------------------------------------


@SETTINGS
@given(documents)
def test_format_then_parse_gives_the_same_ir(document: ir.Document):
    text = format_document(document)
    parsed = parse_ok(text)
    assert parsed == document, f"round trip changed the IR of:\n{text}"
    assert parsed.comments == ()


@SETTINGS
@given(documents)
def test_formatting_is_idempotent(document: ir.Document):
    text = format_document(document)
    again = format_document(parse_ok(text))
    assert again == text


_COMMENT_BODY = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from('#"{}[] \\'),
    max_size=16,
).map(str.rstrip)


# A space between two tokens of formatted text: spaces inside strings and regexes are skipped.
_SPACES = re.compile(r're"(?:[^"\\\n]|\\.)*"|"(?:[^"\\\n]|\\.)*"| ')


@st.composite
def commented(draw) -> tuple[ir.Document, str, list[str]]:
    """A formatted document with comments and line breaks inserted at random places: some
    statements broken over several lines (with end-of-line comments inside them), end-of-line
    comments, comment lines and blank lines. Returns the document, the text and the comments."""
    document = draw(documents)
    text = format_document(document)
    comments: list[str] = []

    def new_comment() -> str:
        comment = f"# c{len(comments)}:" + draw(_COMMENT_BODY)
        comments.append(comment)
        return comment

    # break some lines between tokens, with or without an end-of-line comment at the break
    spaces = [m.start() for m in _SPACES.finditer(text) if m.group() == " "]
    breaks = draw(st.lists(st.sampled_from(spaces), max_size=4, unique=True)) if spaces else []
    pieces, start = [], 0
    for position in sorted(breaks):
        pieces.append(text[start:position])
        pieces.append(" " + new_comment() + "\n" if draw(st.booleans()) else "\n")
        start = position + 1
    lines = "".join([*pieces, text[start:]]).splitlines()

    # end-of-line comments on lines that have none yet
    bare = [i for i, line in enumerate(lines) if "# c" not in line]
    for index in draw(st.lists(st.sampled_from(bare), max_size=4, unique=True)) if bare else []:
        lines[index] += draw(st.sampled_from([" ", "  ", "\t"])) + new_comment()
    # whole-line comments and blank lines at line boundaries, from the bottom up
    places = draw(st.lists(st.integers(0, len(lines)), min_size=1, max_size=8))
    for place in sorted(places, reverse=True):
        if draw(st.booleans()):
            indent = draw(st.sampled_from(["", "  ", "    ", "\t"]))
            lines.insert(place, indent + new_comment())
        else:
            lines.insert(place, "")
    return document, "\n".join(lines) + "\n", comments


def _comment_texts(document: ir.Document) -> list[str]:
    return sorted(c.text.rstrip() for c in document.comments)


@SETTINGS
@given(commented())
def test_comments_survive_formatting(case):
    document, text, comments = case
    source = parse_ok(text)
    assert source == document  # comments do not change the IR
    assert _comment_texts(source) == sorted(comments)

    formatted = format_document(source)
    result = parse_ok(formatted)
    assert result == document, f"formatting with comments changed the IR:\n{formatted}"
    assert _comment_texts(result) == sorted(comments), f"comments lost or doubled:\n{formatted}"
    for comment in comments:
        hits = len(re.findall(re.escape(comment) + r"(?=\n|$)", formatted, re.MULTILINE))
        assert hits == 1, f"{comment!r} appears {hits} times in:\n{formatted}"
    assert format_document(result) == formatted, f"not idempotent:\n{formatted}"
    assert "\n\n\n" not in formatted, f"more than one blank line in a row:\n{formatted}"


# Every slot that takes a whole number, as a function from the number to a one-statement text
# and a way to read the number back from the parsed statement.
BIG = [2**53 - 1, 2**53, 2**53 + 1, 2**63 - 1, 2**64 + 1, 10**20 + 1, 12345678901234567891]


def _setting_doc(setting: ir.Setting) -> ir.Document:
    return ir.Document(PATH, (ir.Version(ir.Num(1)), ir.Defaults((setting,))))


WHOLE_SLOTS = {
    "version": lambda n: ir.Document(PATH, (ir.Version(ir.Num(n)),)),
    "samples": lambda n: ir.Document(
        PATH,
        (
            ir.Version(ir.Num(1)),
            ir.Calibration((ir.DataSource(ir.Word("c.npz")),), samples=ir.Num(n)),
        ),
    ),
    "opset": lambda n: ir.Document(
        PATH, (ir.Version(ir.Num(1)), ir.Target(ir.Word("onnx"), opset=ir.Num(n)))
    ),
    "seed": lambda n: ir.Document(
        PATH, (ir.Version(ir.Num(1)), ir.Allocate(ir.Word("evolution"), seed=ir.Num(n)))
    ),
    "group": lambda n: _setting_doc(
        ir.Weight(ir.Word("int4"), ir.WeightOptions(ir.Granularity("group", ir.Num(n))))
    ),
    "rank": lambda n: _setting_doc(ir.LowRank(ir.Num(n))),
    "n:m": lambda n: _setting_doc(ir.Sparsity(ir.NofM(ir.Num(n), ir.Num(n)))),
}


@pytest.mark.parametrize("slot", sorted(WHOLE_SLOTS))
def test_large_whole_numbers_round_trip_exactly(slot: str):
    for value in BIG:
        document = WHOLE_SLOTS[slot](value)
        text = format_document(document)
        assert str(value) in text
        assert parse_ok(text) == document, f"{value} did not survive the round trip of:\n{text}"


# Numbers as users may write them in the slots that take a fraction. Whatever the parser makes of
# them, formatting must give text that parses back to the same IR.
SPELLINGS = ["0", "007", "0.10", "1.0", "1E+2", "1e-3", "5e-324", "1e308", "1e999", "1e-999"]
SPELLINGS += ["9007199254740993", "123456789012345678901234567890"]
FRACTION_SLOTS = [
    'layer "x" {{ weight int4 round gptq damp {} }}',
    'layer "x" {{ sparsity {} by wanda }}',
    'layer "x" {{ sparsity {}% }}',
    'layer "x" {{ weight choose [int4 sparsity {}, keep] }}',
    "budget {{ weight bits <= {} }}",
    "budget {{ size <= {} MB }}",
    "budget {{ latency <= {} ms on onnx }}",
]


@pytest.mark.parametrize("slot", FRACTION_SLOTS)
def test_numbers_as_written_format_back_to_the_same_ir(slot: str):
    for spelling in SPELLINGS:
        text = "qspec 1\n" + slot.format(spelling) + "\n"
        document, diagnostics = parse_document(text, PATH)
        if document is None or any(d.severity == "error" for d in diagnostics):
            continue  # rejecting a number is fine; changing it is not
        formatted = format_document(document)
        assert parse_ok(formatted) == document, f"{text!r} formatted to {formatted!r}"
        assert format_document(parse_ok(formatted)) == formatted
