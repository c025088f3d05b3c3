"""The typed, immutable IR of a .qspec file.

Every node carries the span it was written at. Spans never take part in equality, so a file and
its formatted version parse to equal IR. Values the user wrote are kept as `Word` and `Num` so
that any later stage (validation, resolution, backends) can point at them in a diagnostic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple


class Span(NamedTuple):
    """Where a node was written: 1-based line and column, end column exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        if self.line < 1:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


NOWHERE = Span("<generated>", 0, 0, 0, 0)


def _span() -> Span:
    return field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class Word:
    """An identifier-like value: a format, method, device, unit, path..."""

    text: str
    span: Span = _span()


@dataclass(frozen=True)
class Num:
    value: int | float
    span: Span = _span()


@dataclass(frozen=True)
class Flag:
    """One of two keywords (symmetric/asymmetric, dynamic/static, actorder)."""

    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Comment:
    text: str
    span: Span = _span()


# ---- top-level statements ---------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    number: Num
    span: Span = _span()


@dataclass(frozen=True)
class Include:
    path: Word
    span: Span = _span()


ModelKind = Literal["python", "hf", "exported"]


@dataclass(frozen=True)
class ModelSource:
    """`model "file.py:function"`, `model hf "folder"` or `model exported "file.pt2"`."""

    kind: ModelKind
    path: Word
    span: Span = _span()


@dataclass(frozen=True)
class DataSource:
    """Batches from a Python entry or an .npz/.safetensors file, with its share of a mix."""

    path: Word
    weight: Num | None = None  # relative to the other sources' (1 when not given)
    span: Span = _span()


@dataclass(frozen=True)
class Calibration:
    """Where calibration batches come from: one source, or several mixed by weight. `samples`
    and `holdout` count rows of the whole mix; each source gives its share of both, so every
    source is verified on rows of its own."""

    sources: tuple[DataSource, ...]
    samples: Num | None = None
    holdout: Num | None = None
    mode: Word | None = None  # sequential | parallel
    span: Span = _span()


@dataclass(frozen=True)
class Verify:
    """A source verified on and never calibrated on: data from where the model will run."""

    source: Word
    samples: Num | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Evaluate:
    entry: Word
    span: Span = _span()


@dataclass(frozen=True)
class Target:
    backend: Word  # onnx | tvm
    alias: Word | None = None
    device: Word | None = None
    arch: Word | None = None
    mcpu: Word | None = None
    opset: Num | None = None
    tune_trials: Num | None = None
    span: Span = _span()

    @property
    def name(self) -> str:
        """How budgets refer to the target: its alias, or its backend."""
        return (self.alias or self.backend).text


@dataclass(frozen=True)
class Pattern:
    """A layer-name pattern: a glob (`*`, `?`, `[0-2]`, `{a,b}`) or a regex, both full-match."""

    text: str
    regex: bool = False
    span: Span = _span()


# ---- settings inside `defaults { }` and `layer PATTERN { }` ----------------------------------


@dataclass(frozen=True)
class Granularity:
    kind: Literal["tensor", "channel", "token", "group"]
    size: Num | None = None  # group size
    span: Span = _span()


@dataclass(frozen=True)
class Rounding:
    method: Word  # nearest | gptq
    damp: Num | None = None
    actorder: Flag | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Search:
    targets: tuple[Word, ...]  # clip | format
    span: Span = _span()


@dataclass(frozen=True)
class WeightOptions:
    """Quantizer options shared by a `weight` statement and each of its `choose` candidates."""

    granularity: Granularity | None = None
    symmetric: Flag | None = None
    scale: Word | None = None
    rounding: Rounding | None = None
    search: Search | None = None


@dataclass(frozen=True)
class NofM:
    n: Num
    m: Num
    span: Span = _span()


@dataclass(frozen=True)
class Ratio:
    """Unstructured sparsity: the fraction of weights set to zero, written as 0.5 or 50%."""

    value: Num
    percent: bool = False
    span: Span = _span()

    @property
    def fraction(self) -> float:
        return self.value.value / 100 if self.percent else float(self.value.value)


@dataclass(frozen=True)
class Sparsity:
    pattern: NofM | Ratio | None  # None: `sparsity none`
    method: Word | None = None  # magnitude | wanda | sparsegpt
    span: Span = _span()


@dataclass(frozen=True)
class LowRank:
    """`compensate lora rank R by svd|eora [finetune steps N] [factors fp16|int8]`."""

    rank: Num
    method: Word | None = None
    finetune_steps: Num | None = None
    factors: Word | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Candidate:
    """One entry of `weight choose [...]`; `keep` leaves the layer in float."""

    format: Word | None  # None for `keep`
    options: WeightOptions = WeightOptions()
    sparsity: Sparsity | None = None
    lowrank: LowRank | None = None
    span: Span = _span()

    @property
    def keep(self) -> bool:
        return self.format is None


@dataclass(frozen=True)
class Weight:
    """`weight FORMAT options` or `weight choose [candidates] options`."""

    format: Word | None
    options: WeightOptions = WeightOptions()
    candidates: tuple[Candidate, ...] | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Calibrate:
    method: Word  # minmax | percentile | mse | entropy
    value: Num | None = None  # percentile's P
    span: Span = _span()


@dataclass(frozen=True)
class Activation:
    format: Word | None  # None: `activation none`
    granularity: Granularity | None = None
    symmetric: Flag | None = None
    dynamic: Flag | None = None
    calibrate: Calibrate | None = None  # how a static range is chosen
    span: Span = _span()


@dataclass(frozen=True)
class BiasCorrection:
    span: Span = _span()


@dataclass(frozen=True)
class CompensateNone:
    span: Span = _span()


@dataclass(frozen=True)
class Keep:
    span: Span = _span()


Setting = Weight | Activation | Sparsity | LowRank | BiasCorrection | CompensateNone | Keep


@dataclass(frozen=True)
class Defaults:
    settings: tuple[Setting, ...]
    span: Span = _span()


@dataclass(frozen=True)
class LayerRule:
    pattern: Pattern
    settings: tuple[Setting, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Tie:
    """Layers matched by the pattern share one choice, grouped by what the wildcards matched."""

    pattern: Pattern
    span: Span = _span()


# ---- budgets and allocation --------------------------------------------------------------------

Metric = Literal["weight_bits", "size", "bops", "latency"]

# How a spec writes each metric (`weight bits <= 4.5`), for messages, limits and sweeps.
METRIC_WORDS: dict[Metric, str] = {
    "weight_bits": "weight bits",
    "size": "size",
    "bops": "bops",
    "latency": "latency",
}

UNITS: dict[Metric, dict[str, float]] = {
    "weight_bits": {},
    "size": {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30},
    "bops": {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12},
    "latency": {"us": 1e-6, "ms": 1e-3, "s": 1.0},
}


@dataclass(frozen=True)
class Limit:
    """One budget line: `weight bits <= 4.5`, `size <= 12 MB`, `latency <= 8 ms on onnx`."""

    metric: Metric
    value: Num
    unit: Word | None = None
    target: Word | None = None
    span: Span = _span()

    @property
    def amount(self) -> float:
        """The bound in base units: bits, bytes, bit-operations or seconds."""
        scale = UNITS[self.metric].get(self.unit.text, 1.0) if self.unit else 1.0
        return self.value.value * scale


@dataclass(frozen=True)
class Budget:
    limits: tuple[Limit, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Allocate:
    strategy: Word  # ilp | evolution
    generations: Num | None = None
    offspring: Num | None = None
    seed: Num | None = None
    fitness: Word | None = None
    sensitivity: Word | None = None
    span: Span = _span()


Statement = (
    Version
    | Include
    | ModelSource
    | Calibration
    | Verify
    | Evaluate
    | Target
    | Defaults
    | LayerRule
    | Tie
    | Budget
    | Allocate
)


@dataclass(frozen=True)
class Document:
    """One file as written: its statements in order, and its comments for the formatter."""

    path: str
    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Spec:
    """A checked spec with its includes merged, in precedence order.

    `rules` holds every `defaults` block first (they have the lowest precedence), then the layer
    rules in the order they appear with includes spliced in place.
    """

    path: str
    model: ModelSource | None
    calibration: Calibration | None
    verify: tuple[Verify, ...]
    evaluate: Evaluate | None
    targets: tuple[Target, ...]
    rules: tuple[Defaults | LayerRule, ...]
    ties: tuple[Tie, ...]
    limits: tuple[Limit, ...]
    allocate: Allocate | None
    files: tuple[str, ...]

    @property
    def layer_rules(self) -> tuple[LayerRule, ...]:
        return tuple(r for r in self.rules if isinstance(r, LayerRule))
