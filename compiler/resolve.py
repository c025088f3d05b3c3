"""Match the spec's rules to the model's layers: one LayerPlan per layer.

Rules apply in precedence order (all `defaults` blocks, then layer rules as written); a later
rule overrides exactly the fields it sets. Each resolved field remembers the span that set it,
which `qspec explain`, the report and error messages show.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from qspec.compiler.capture import Graph, Layer
from qspec.compiler.errors import UserError
from qspec.compiler.numerics import GRANULARITIES, SCALES, QuantSpec
from qspec.dsl import ir
from qspec.dsl.diagnostics import Diagnostic, Note
from qspec.dsl.formats import weight_format
from qspec.dsl.load import read_source
from qspec.dsl.parser import normalize
from qspec.dsl.patterns import PatternError, matches
from qspec.dsl.validate import Checker

DEFAULT_GROUP = 32


@dataclass(frozen=True)
class WeightPlan:
    """How one weight is compressed: its quantizer, and how its codes are chosen."""

    quantizer: QuantSpec
    rounding: str = "nearest"  # a rounding method of `passes.methods`
    damp: float = 0.01
    actorder: bool = False
    search: tuple[str, ...] = ()  # quantizer parameters searched: clip, format

    @property
    def bits(self) -> int:
        return self.quantizer.format.bits

    def describe(self) -> str:
        quantizer = self.quantizer
        grain: str = quantizer.granularity
        if grain == "group":
            grain = f"group {quantizer.group_size}"
        parts = [quantizer.format.name, grain, "sym" if quantizer.symmetric else "asym"]
        if quantizer.scale_format != "fp32":
            parts.append(f"scale {quantizer.scale_format}")
        if self.rounding != "nearest":
            parts.append(self.rounding)
        parts += [f"search {s}" for s in self.search]
        return " ".join(parts)


@dataclass(frozen=True)
class ActivationPlan:
    format: str
    granularity: str  # tensor | token
    dynamic: bool
    symmetric: bool
    calibrate: str = "minmax"  # how a static range is chosen: minmax | percentile | mse | entropy
    percentile: float | None = None

    def describe(self) -> str:
        if self.dynamic:
            return f"{self.format} {self.granularity} dynamic"
        method = self.calibrate + (f" {self.percentile:g}" if self.percentile else "")
        return f"{self.format} {self.granularity} static" + (
            f" calibrate {method}" if method != "minmax" else ""
        )


@dataclass(frozen=True)
class SparsityPlan:
    n: int | None
    m: int | None
    ratio: float | None
    method: str

    @property
    def density(self) -> float:
        return self.n / self.m if self.n and self.m else 1 - (self.ratio or 0.0)

    @property
    def pattern(self) -> tuple[int, int] | float:
        """The solvers' form: (n, m), or the fraction pruned."""
        if self.n is not None and self.m is not None:
            return (self.n, self.m)
        assert self.ratio is not None
        return self.ratio

    def describe(self) -> str:
        pattern = f"{self.n}:{self.m}" if self.m else f"{self.ratio:.0%}"
        return f"{pattern} {self.method}"


@dataclass(frozen=True)
class LowRankPlan:
    rank: int
    method: str
    finetune_steps: int
    factors: str


@dataclass(frozen=True)
class CandidatePlan:
    weight: WeightPlan | None  # None: keep in float
    sparsity: SparsityPlan | None
    lowrank: LowRankPlan | None

    def describe(self) -> str:
        if self.weight is None:
            return "keep"
        parts = [self.weight.describe()]
        if self.sparsity:
            parts.append("sparse " + self.sparsity.describe())
        if self.lowrank:
            parts.append(f"lora r{self.lowrank.rank} {self.lowrank.method}")
        return ", ".join(parts)


@dataclass(frozen=True)
class LayerPlan:
    layer: Layer
    weight: WeightPlan | None
    activation: ActivationPlan | None
    sparsity: SparsityPlan | None
    lowrank: LowRankPlan | None
    bias_correction: bool
    candidates: tuple[CandidatePlan, ...] | None = None
    sources: dict[str, ir.Span] = field(default_factory=dict, compare=False)

    @property
    def compressed(self) -> bool:
        return any((self.weight, self.activation, self.sparsity, self.lowrank, self.candidates))

    def choose(self, candidate: CandidatePlan) -> LayerPlan:
        """This plan with one of its candidates decided (`keep` leaves the layer all float)."""
        if candidate.weight is None:
            return replace(
                self,
                weight=None,
                activation=None,
                sparsity=None,
                lowrank=None,
                bias_correction=False,
                candidates=None,
            )
        lowrank = candidate.lowrank or self.lowrank
        return replace(
            self,
            weight=candidate.weight,
            sparsity=candidate.sparsity,
            lowrank=lowrank,
            candidates=None,
        )

    def describe(self) -> str:
        if not self.compressed and not self.bias_correction:
            return "float"
        parts = []
        if self.candidates:
            parts.append(f"choose among {len(self.candidates)}")
        if self.weight:
            parts.append(self.weight.describe())
        if self.activation:
            parts.append("act " + self.activation.describe())
        if self.sparsity:
            parts.append("sparse " + self.sparsity.describe())
        if self.lowrank:
            parts.append(f"lora r{self.lowrank.rank} {self.lowrank.method}")
        if self.bias_correction:
            parts.append("bias correction")
        return ", ".join(parts)


@dataclass
class Plan:
    layers: dict[str, LayerPlan]
    matches: list[tuple[ir.Defaults | ir.LayerRule, int]]  # each rule and its match count
    warnings: list[Diagnostic] = field(default_factory=list)  # located; the driver prints them


# ---- resolution ------------------------------------------------------------------------------

FIELDS = ("weight", "activation", "sparsity", "lora", "bias")
WEIGHT_OPTIONS = ("granularity", "symmetric", "scale", "rounding", "search")


def resolve(spec: ir.Spec, graph: Graph) -> Plan:
    matches: list[tuple[ir.Defaults | ir.LayerRule, int]] = []
    assigned: dict[str, dict[str, tuple[Any, ir.Span]]] = {name: {} for name in graph.layers}
    for rule in spec.rules:
        names = _matching(rule, graph)
        matches.append((rule, len(names)))
        if not names:
            _no_match(rule, graph)
        for name in names:
            _apply(rule.settings, assigned[name])
    clipped: Clipped = {}
    layers = {name: _plan(graph.layers[name], assigned[name], clipped) for name in graph.layers}
    return Plan(layers, matches, [_clipped_warning(node, got) for node, got in clipped.items()])


def _matching(rule: ir.Defaults | ir.LayerRule, graph: Graph) -> list[str]:
    if isinstance(rule, ir.Defaults):
        return list(graph.layers)
    try:
        return [name for name in graph.layers if matches(rule.pattern, name)]
    except PatternError as error:
        raise UserError(error.message, rule.pattern.span, help="simplify the pattern") from None


def print_warnings(plan: Plan) -> None:
    """The plan's warnings on stderr, each with its spec line (they do not stop a build)."""
    sources: dict[str, str] = {}
    for warning in plan.warnings:
        file = warning.span.file
        if file not in sources:
            text, _ = read_source(file)
            sources[file] = normalize(text or "")
        print(warning.render(sources), file=sys.stderr)


def _clipped_warning(node: ir.LowRank, layers: list[tuple[str, int]]) -> Diagnostic:
    shown = ", ".join(f"{name} ({rank})" for name, rank in layers[:3])
    more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
    return Diagnostic(
        "warning",
        f"rank {node.rank.value} is more than {_plural_layers(layers)} can use; "
        f"each gets rank min(rows, cols): {shown}{more}",
        node.rank.span,
        help="a rank of min(rows, cols) already corrects the whole error; lower the rank",
    )


def _plural_layers(layers: list[tuple[str, int]]) -> str:
    return "the layer" if len(layers) == 1 else f"{len(layers)} layers"


def _no_match(rule: ir.Defaults | ir.LayerRule, graph: Graph) -> None:
    if isinstance(rule, ir.Defaults):
        raise UserError("the model has no compressible layers", rule.span)
    stripped = rule.pattern.text.replace("*", "").replace("\\", "")
    close = difflib.get_close_matches(stripped, list(graph.layers), n=3, cutoff=0.0)
    raise UserError(
        f"'{rule.pattern.text}' matches no layer of the model",
        rule.pattern.span,
        help="closest layer names: " + ", ".join(close) if close else None,
    )


def _apply(settings: tuple[ir.Setting, ...], fields: dict[str, tuple[Any, ir.Span]]) -> None:
    """Assign the fields a rule's settings set (later rules call this after earlier ones)."""
    for setting in settings:
        span = setting.span
        if isinstance(setting, ir.Keep):
            for name in (*FIELDS, *(f"weight.{o}" for o in WEIGHT_OPTIONS)):
                fields[name] = (None, span)
        elif isinstance(setting, ir.Weight):
            fields["weight"] = (setting, span)
            for option in WEIGHT_OPTIONS:
                node = getattr(setting.options, option)
                if node is not None:
                    fields[f"weight.{option}"] = (node, node.span)
        elif isinstance(setting, ir.Activation):
            fields["activation"] = (setting if setting.format else None, span)
        elif isinstance(setting, ir.Sparsity):
            fields["sparsity"] = (setting if setting.pattern else None, span)
        elif isinstance(setting, ir.LowRank):
            fields["lora"] = (setting, span)
        elif isinstance(setting, ir.BiasCorrection):
            fields["bias"] = (True, span)
        elif isinstance(setting, ir.CompensateNone):
            fields["lora"] = (None, span)
            fields["bias"] = (False, span)


def _plan(layer: Layer, fields: dict[str, tuple[Any, ir.Span]], clipped: Clipped) -> LayerPlan:
    def value(name: str) -> Any:
        return fields.get(name, (None, None))[0]

    sources = {name: span for name, (_, span) in fields.items()}
    weight: ir.Weight | None = value("weight")
    options = ir.WeightOptions(**{o: value(f"weight.{o}") for o in WEIGHT_OPTIONS})
    sparsity_node: ir.Sparsity | None = value("sparsity")
    weight_plan = candidates = None
    if weight is not None and weight.candidates is None:
        assert weight.format is not None
        weight_plan = _weight_plan(layer, weight.format, options, sparsity_node)
    elif weight is not None and weight.candidates is not None:
        candidates = tuple(
            _candidate(layer, c, options, sparsity_node, clipped) for c in weight.candidates
        )
    activation = _activation_plan(layer, value("activation"))
    sparsity = _sparsity_plan(layer, sparsity_node)
    lora = value("lora")
    lowrank = _lowrank_plan(layer, lora, clipped) if lora is not None else None
    return LayerPlan(
        layer, weight_plan, activation, sparsity, lowrank, bool(value("bias")), candidates, sources
    )


def _candidate(
    layer: Layer,
    candidate: ir.Candidate,
    shared: ir.WeightOptions,
    sparsity: ir.Sparsity | None,
    clipped: Clipped,
) -> CandidatePlan:
    if candidate.format is None:
        return CandidatePlan(None, None, None)
    options = ir.WeightOptions(
        **{
            o: getattr(candidate.options, o) or getattr(shared, o)
            for o in ir.WeightOptions.__dataclass_fields__
        }
    )
    own_sparsity = candidate.sparsity or sparsity
    return CandidatePlan(
        _weight_plan(layer, candidate.format, options, own_sparsity),
        _sparsity_plan(layer, own_sparsity),
        _lowrank_plan(layer, candidate.lowrank, clipped) if candidate.lowrank else None,
    )


def _weight_plan(
    layer: Layer, name: ir.Word, options: ir.WeightOptions, sparsity: ir.Sparsity | None
) -> WeightPlan:
    fmt = weight_format(name.text)
    assert fmt is not None
    _check_combination(name, options, sparsity)
    granularity = options.granularity
    kind = granularity.kind if granularity else ("channel" if fmt.bits >= 8 else "group")
    group = None
    if kind == "group":
        group = int(granularity.size.value) if granularity and granularity.size else DEFAULT_GROUP
        _check_group(layer, group, granularity.span if granularity else name.span)
    symmetric = options.symmetric.value if options.symmetric else fmt.family != "uint"
    rounding = options.rounding
    quantizer = QuantSpec(
        format=fmt,
        granularity=GRANULARITIES[kind],
        group_size=group,
        symmetric=symmetric,
        scale_format=SCALES[options.scale.text if options.scale else "fp32"],
    )
    return WeightPlan(
        quantizer,
        rounding=rounding.method.text if rounding else "nearest",
        damp=float(rounding.damp.value) if rounding and rounding.damp else 0.01,
        actorder=bool(rounding and rounding.actorder),
        search=tuple(t.text for t in options.search.targets) if options.search else (),
    )


def _check_combination(
    name: ir.Word, options: ir.WeightOptions, sparsity: ir.Sparsity | None
) -> None:
    """The language's combination rules, now on the merged fields of one layer."""
    checker = Checker()
    checker.quantizer(name, options, sparsity)
    granularity = options.granularity
    if options.scale and options.scale.text == "e8m0" and not (granularity and granularity.size):
        checker.error(
            "e8m0 scales are shared per block (OCP MX)",
            options.scale.span,
            help="add a block size, for instance group 32",
        )
    errors = [d for d in checker.diagnostics if d.severity == "error"]
    if errors:
        first = errors[0]
        raise UserError(
            first.message,
            first.span,
            expected=first.expected,
            help=first.help,
            notes=[Note("the format is set here", name.span), *first.notes],
        )


def _check_group(layer: Layer, group: int, span: ir.Span) -> None:
    if layer.kind.startswith("conv") and layer.channel_run % group:
        raise UserError(
            f"group {group} does not divide the {layer.channel_run} input channels of "
            f"{layer.name} ({layer.kind})",
            span,
            help="use channel granularity for this layer, or a group that divides its channels",
        )


def _activation_plan(layer: Layer, node: ir.Activation | None) -> ActivationPlan | None:
    if node is None or node.format is None:
        return None
    if layer.kind == "embedding":
        raise UserError(
            f"{layer.name} is an embedding: its input is indices, not activations", node.span
        )
    granularity = node.granularity.kind if node.granularity else "tensor"
    dynamic = node.dynamic.value if node.dynamic else True
    fmt = node.format.text
    symmetric = node.symmetric.value if node.symmetric else fmt != "uint8"
    if node.calibrate is None:
        return ActivationPlan(fmt, granularity, dynamic, symmetric)
    value = node.calibrate.value.value if node.calibrate.value else None
    return ActivationPlan(fmt, granularity, dynamic, symmetric, node.calibrate.method.text, value)


def _sparsity_plan(layer: Layer, node: ir.Sparsity | None) -> SparsityPlan | None:
    if node is None or node.pattern is None:
        return None
    if layer.kind == "embedding":
        raise UserError(f"{layer.name} is an embedding: sparsity applies to matmuls", node.span)
    method = node.method.text if node.method else "magnitude"
    if isinstance(node.pattern, ir.NofM):
        m = int(node.pattern.m.value)
        if layer.channel_run % m:
            raise UserError(
                f"{layer.name} has {layer.channel_run} input channels, not a multiple of {m}",
                node.pattern.span,
            )
        return SparsityPlan(int(node.pattern.n.value), m, None, method)
    return SparsityPlan(None, None, node.pattern.fraction, method)


Clipped = dict[ir.LowRank, list[tuple[str, int]]]
"""`rank` settings above what a layer can use -> (layer, rank used) for each such layer."""


def _lowrank_plan(layer: Layer, node: ir.LowRank, clipped: Clipped) -> LowRankPlan:
    """The low-rank plan with the rank the layer can use: a correction of rank min(rows, cols)
    is already exact, so a larger one is clipped (and reported), and the plan, the costs and the
    manifest carry the rank that is emitted."""
    usable = min(layer.rows, layer.cols)
    rank = int(node.rank.value)
    if rank > usable:
        clipped.setdefault(node, []).append((layer.name, usable))
        rank = usable
    return LowRankPlan(
        rank=rank,
        method=node.method.text if node.method else "svd",
        finetune_steps=int(node.finetune_steps.value) if node.finetune_steps else 0,
        factors=node.factors.text if node.factors else "fp16",
    )


# ---- explain -------------------------------------------------------------------------------


def explain(plan: Plan, chosen: dict[str, str] | None = None) -> str:
    """The per-layer table and each rule's match count, for `qspec explain`; `chosen` replaces
    the settings of layers a build's allocator decided."""
    chosen = chosen or {}
    rows = [("layer", "kind", "shape", "settings", "decided by")]
    for name, layer_plan in plan.layers.items():
        layer = layer_plan.layer
        deciding = sorted({span for span in layer_plan.sources.values() if span.line})
        where = ", ".join(f"{_short(s.file)}:{s.line}" for s in deciding) or "-"
        shape = "x".join(str(d) for d in layer.weight_shape)
        settings = chosen.get(name, layer_plan.describe())
        rows.append((name, layer.kind, shape, settings, where))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True))
        for row in rows
    ]
    lines.append("")
    for rule, count in plan.matches:
        what = "defaults" if isinstance(rule, ir.Defaults) else f"layer {_pattern(rule.pattern)}"
        lines.append(f"{_short(rule.span.file)}:{rule.span.line}: {what} matches {count} layers")
    return "\n".join(lines)


def _pattern(pattern: ir.Pattern) -> str:
    return f're"{pattern.text}"' if pattern.regex else f'"{pattern.text}"'


def _short(path: str) -> str:
    return path.rsplit("/", 1)[-1]
