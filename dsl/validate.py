"""Semantic checks that need no model: combinations the language cannot mean.

Each check appends diagnostics and never stops early, so one run reports every mistake.
Checks that need the layers of a model (a rule that matches nothing, shapes that a group size
does not divide) belong to resolution.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from qspec.dsl import ir
from qspec.dsl.diagnostics import Diagnostic, Note, did_you_mean
from qspec.dsl.formats import weight_format
from qspec.dsl.patterns import PatternError, check_pattern
from qspec.dsl.vocabulary import DEVICES

OPSETS = range(17, 26)
LANGUAGE_VERSION = 1


class Checker:
    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []

    def error(
        self,
        message: str,
        span: ir.Span,
        expected: str | None = None,
        *,
        help: str | None = None,
        notes: Iterable[Note] = (),
    ) -> None:
        self.diagnostics.append(Diagnostic("error", message, span, expected, help, tuple(notes)))

    def warning(
        self, message: str, span: ir.Span, *, help: str | None = None, notes: Iterable[Note] = ()
    ) -> None:
        self.diagnostics.append(Diagnostic("warning", message, span, None, help, tuple(notes)))

    # ---- sources -------------------------------------------------------------------------------

    def model(self, model: ir.ModelSource) -> None:
        path = model.path.text
        if model.kind == "python" and not _is_entry(path):
            help_text = 'a Python entry is written as "file.py:function"'
            if path.endswith(".pt2"):
                help_text = f'for an exported program write: model exported "{path}"'
            elif ":" not in path and not path.endswith(".py"):
                help_text = f'for a Hugging Face folder write: model hf "{path}"'
            self.error(
                f"'{path}' is not a Python entry",
                model.path.span,
                '"file.py:function"',
                help=help_text,
            )
        if model.kind == "exported" and not path.endswith(".pt2"):
            self.error(
                f"'{path}' is not an exported program",
                model.path.span,
                "a .pt2 file written by torch.export.save",
            )

    def calibration(self, calibration: ir.Calibration) -> None:
        seen: dict[str, ir.DataSource] = {}
        for source in calibration.sources:
            self.data_source(source.path, "calibration source")
            if source.weight is not None and not source.weight.value > 0:
                self.error(
                    "a source's weight must be above 0",
                    source.weight.span,
                    help="weights are relative shares of samples and holdout: drop the source "
                    "instead of weighting it 0",
                )
            first = seen.setdefault(source.path.text, source)
            if first is not source:
                self.error(
                    f"'{source.path.text}' is named twice",
                    source.path.span,
                    help="give it one weight",
                    notes=(Note("first named here", first.path.span),),
                )
        if calibration.samples is not None and calibration.samples.value < 1:
            self.error("samples must be at least 1", calibration.samples.span)
        if calibration.holdout is not None and calibration.holdout.value < 1:
            self.error(
                "holdout must be at least 1",
                calibration.holdout.span,
                help="verification runs the artifact on the held-out rows: hold out at least one",
            )
        for count in (calibration.samples, calibration.holdout):
            if count is not None and 1 <= count.value < len(calibration.sources):
                self.error(
                    f"{count.value} rows cannot be shared by {len(calibration.sources)} sources",
                    count.span,
                    help="every source gives at least one row of samples and of holdout",
                )

    def verify(self, verify: ir.Verify, calibration: ir.Calibration | None) -> None:
        self.data_source(verify.source, "verification source")
        if verify.samples is not None and verify.samples.value < 1:
            self.error("samples must be at least 1", verify.samples.span)
        named = {s.path.text: s for s in calibration.sources} if calibration else {}
        if verify.source.text in named:
            self.error(
                f"'{verify.source.text}' is also a calibration source",
                verify.source.span,
                help="verify on data the build never calibrated on; the calibration sources "
                "are verified on their own held-out rows already",
                notes=(Note("calibrated on here", named[verify.source.text].path.span),),
            )

    def data_source(self, word: ir.Word, what: str) -> None:
        if not (_is_entry(word.text) or word.text.endswith((".npz", ".safetensors"))):
            self.error(
                f"'{word.text}' is not a {what}",
                word.span,
                'a Python entry "file.py:function" or an .npz or .safetensors file',
            )

    def evaluate(self, evaluate: ir.Evaluate) -> None:
        if not _is_entry(evaluate.entry.text):
            self.error(
                f"'{evaluate.entry.text}' is not a Python entry",
                evaluate.entry.span,
                '"file.py:function" returning a score, higher is better',
            )

    # ---- targets -------------------------------------------------------------------------------

    def targets(self, targets: Iterable[ir.Target]) -> None:
        seen: dict[str, ir.Target] = {}
        for target in targets:
            self.target(target)
            if target.name in seen:
                self.error(
                    f"target '{target.name}' is defined twice",
                    target.span,
                    help=f"give this one another name: target {target.backend.text} as NAME",
                    notes=[Note("first defined here", seen[target.name].span)],
                )
            else:
                seen[target.name] = target

    def target(self, target: ir.Target) -> None:
        backend = target.backend.text
        devices = DEVICES.get(backend)
        if devices is None:
            return  # unknown backend: reported by the parser
        device = target.device.text if target.device else devices[0]
        if target.device and device not in devices:
            self.error(
                f"{backend} cannot compile for device '{device}'",
                target.device.span,
                " or ".join(devices),
                help="tvm calls the host CPU 'llvm'"
                if (backend, device) == ("tvm", "cpu")
                else did_you_mean(device, devices),
            )
        if target.arch:
            if device != "cuda":
                self.error("arch is only meaningful with device cuda", target.arch.span)
            elif not re.fullmatch(r"sm_[0-9]{2,3}a?", target.arch.text):
                self.error(
                    f"'{target.arch.text}' is not a CUDA architecture",
                    target.arch.span,
                    "a compute capability such as sm_80 or sm_90",
                )
        if target.opset and backend != "onnx":
            self.error("opset only applies to the onnx backend", target.opset.span)
        elif target.opset and target.opset.value not in OPSETS:
            self.error(
                f"opset {target.opset.value} is not supported",
                target.opset.span,
                f"an opset from {OPSETS.start} to {OPSETS.stop - 1}",
            )
        if target.tune_trials and backend != "tvm":
            self.error("tune trials only apply to the tvm backend", target.tune_trials.span)
        elif target.tune_trials and target.tune_trials.value < 1:
            self.error("tune trials must be at least 1", target.tune_trials.span)
        if target.mcpu and (backend != "tvm" or device != "llvm"):
            self.error("mcpu only applies to tvm with device llvm", target.mcpu.span)

    # ---- rules ---------------------------------------------------------------------------------

    def rules(self, rules: Iterable[ir.Defaults | ir.LayerRule]) -> None:
        rules = list(rules)
        for rule in rules:
            self.settings(rule.settings, rule.span)
            if isinstance(rule, ir.LayerRule):
                self.pattern(rule.pattern)
        # A rule is dead when later rules with the same pattern set every field it sets.
        later: dict[tuple[str, bool], tuple[set[str], ir.LayerRule]] = {}
        for rule in reversed(rules):
            if not isinstance(rule, ir.LayerRule):
                continue
            key = (rule.pattern.text, rule.pattern.regex)
            fields = _fields(rule.settings)
            if key in later and fields and fields <= later[key][0]:
                self.warning(
                    "this rule has no effect: later rules with the same pattern "
                    "set all of its fields",
                    rule.span,
                    help="merge the rules or delete this one",
                    notes=[Note("overridden here", later[key][1].span)],
                )
            overriding, last = later.get(key, (set(), rule))
            later[key] = (overriding | fields, last)

    def pattern(self, pattern: ir.Pattern) -> None:
        try:
            check_pattern(pattern)
        except PatternError as error:
            start = pattern.span.column + (3 if pattern.regex else 1) + error.offset
            span = ir.Span(
                pattern.span.file, pattern.span.line, start, pattern.span.line, start + 1
            )
            self.error(error.message, span)

    def settings(self, settings: tuple[ir.Setting, ...], rule_span: ir.Span) -> None:
        if not settings:
            self.warning("this rule sets nothing", rule_span)
        seen: dict[str, ir.Setting] = {}
        for setting in settings:
            field = _FIELD[type(setting)]
            if field in seen:
                self.error(
                    f"{field} is set twice in one rule",
                    setting.span,
                    help="merge them into one statement",
                    notes=[Note("first set here", seen[field].span)],
                )
            seen[field] = setting
        keep = seen.get("keep")
        if keep and len(seen) > 1:
            other = next(s for f, s in seen.items() if f != "keep")
            self.error(
                "keep cannot be combined with other settings",
                keep.span,
                help="keep leaves the layer in float: remove the other settings or keep",
                notes=[Note("setting here", other.span)],
            )
        if "compensate none" in seen and ("lora" in seen or "bias correction" in seen):
            self.error(
                "compensate none contradicts another compensate in this rule",
                seen["compensate none"].span,
            )
        sparsity = seen.get("sparsity")
        for setting in settings:
            if isinstance(setting, ir.Weight):
                rule_sparsity = sparsity if isinstance(sparsity, ir.Sparsity) else None
                self.weight(setting, rule_sparsity)
            elif isinstance(setting, ir.Activation):
                self.activation(setting)
            elif isinstance(setting, ir.Sparsity):
                self.sparsity(setting)
            elif isinstance(setting, ir.LowRank):
                self.lowrank(setting)

    def weight(self, weight: ir.Weight, sparsity: ir.Sparsity | None) -> None:
        if weight.candidates is None:
            assert weight.format is not None
            self.quantizer(weight.format, weight.options, sparsity)
            return
        if len(weight.candidates) < 2:
            self.warning(
                "choose has a single candidate",
                weight.span,
                help="write the format directly, or add candidates",
            )
        for i, candidate in enumerate(weight.candidates):
            if candidate in weight.candidates[:i]:
                self.warning("this candidate is listed twice", candidate.span)
            if candidate.keep:
                continue
            assert candidate.format is not None
            options = _merged(weight.options, candidate.options)
            self.quantizer(candidate.format, options, candidate.sparsity or sparsity)
            if candidate.sparsity:
                self.sparsity(candidate.sparsity)
            if candidate.lowrank:
                self.lowrank(candidate.lowrank)

    def quantizer(
        self, name: ir.Word, options: ir.WeightOptions, sparsity: ir.Sparsity | None
    ) -> None:
        fmt = weight_format(name.text)
        if fmt is None:
            return  # unknown format: reported by the parser
        granularity = options.granularity
        if granularity and granularity.kind == "token":
            self.error(
                "weights cannot be quantized per token",
                granularity.span,
                "tensor, channel or group N",
            )
        group = granularity.size.value if granularity and granularity.size else None
        if granularity and granularity.size and granularity.size.value < 2:
            self.error("a group holds at least 2 weights", granularity.size.span)
        if options.symmetric is not None:
            if not options.symmetric.value and not fmt.is_integer:
                self.error(
                    f"{fmt.name} has a fixed symmetric grid and no zero point",
                    options.symmetric.span,
                    help="asymmetric needs an integer format such as int4",
                )
            if options.symmetric.value and fmt.family == "uint":
                self.error(
                    f"{fmt.name} codes are unsigned with a zero point",
                    options.symmetric.span,
                    help=f"for a symmetric grid use int{fmt.bits}",
                )
        if options.scale and options.scale.text == "e8m0" and granularity and group is None:
            self.error(
                "e8m0 scales are shared per block (OCP MX)",
                options.scale.span,
                help="add a block size, for instance group 32",
            )
        if options.search:
            for target in options.search.targets:
                if target.text == "format" and not fmt.is_float:
                    self.error(
                        f"search format needs an fp format, not {fmt.name}",
                        target.span,
                        help="search format picks the exponent/mantissa split of fp4 or fp8",
                    )
        rounding = options.rounding
        if rounding and rounding.method.text != "gptq":
            for extra in (rounding.damp, rounding.actorder):
                if extra is not None:
                    self.error("damp and actorder are options of round gptq", extra.span)
        if rounding and rounding.damp is not None and not 0 < rounding.damp.value <= 1:
            self.error(
                "damp must be in (0, 1]",
                rounding.damp.span,
                help="0.01 (1% of the mean Hessian diagonal) is the usual value",
            )
        if group and sparsity and isinstance(sparsity.pattern, ir.NofM):
            m = sparsity.pattern.m.value
            if m > 0 and group % m:
                assert granularity is not None
                self.error(
                    f"group {group} is not a multiple of the sparsity block {m}",
                    granularity.span,
                    help=f"N:M blocks must not straddle quantization groups; "
                    f"use group {group + m - group % m}",
                )

    def activation(self, activation: ir.Activation) -> None:
        granularity = activation.granularity
        if granularity and granularity.kind not in ("tensor", "token"):
            self.error(
                "activations are quantized per tensor or per token",
                granularity.span,
                "tensor or token",
            )
        static = activation.dynamic is not None and not activation.dynamic.value
        if granularity and granularity.kind == "token" and static:
            assert activation.dynamic is not None
            self.error(
                "per-token scales are computed at run time",
                activation.dynamic.span,
                help="write dynamic, or use tensor for static scales",
            )
        if activation.calibrate:
            self.calibrate(activation.calibrate, static)
        fmt, symmetric = activation.format, activation.symmetric
        if fmt and symmetric and not symmetric.value and fmt.text.startswith("fp8"):
            self.error(f"{fmt.text} has no zero point", symmetric.span)
        if fmt and symmetric and symmetric.value and fmt.text == "uint8":
            self.error(
                "uint8 codes are unsigned with a zero point",
                symmetric.span,
                help="for symmetric activations use int8",
            )

    def calibrate(self, calibrate: ir.Calibrate, static: bool) -> None:
        if not static:
            self.error(
                "a calibration method chooses a static range",
                calibrate.span,
                help="write `static` before it (dynamic scales are computed at run time)",
            )
        method, value = calibrate.method.text, calibrate.value
        if method == "percentile" and value is None:
            self.error("percentile needs P", calibrate.span, "a number such as 99.99")
        elif method == "percentile" and value is not None and not 50 < value.value <= 100:
            self.error("the percentile P lies in (50, 100]", value.span, "a number such as 99.99")
        elif method != "percentile" and value is not None:
            self.error(f"{method} takes no number", value.span, help="percentile P does")

    def sparsity(self, sparsity: ir.Sparsity) -> None:
        pattern = sparsity.pattern
        if isinstance(pattern, ir.NofM):
            n, m = pattern.n.value, pattern.m.value
            if not 0 < n < m:
                self.error(
                    f"{n}:{m} sparsity is impossible",
                    pattern.span,
                    "N:M with 0 < N < M, such as 2:4 (2 of every 4 weights kept)",
                )
        elif isinstance(pattern, ir.Ratio) and not 0 < pattern.fraction < 1:
            self.error(
                "an unstructured sparsity ratio lies strictly between 0 and 1",
                pattern.span,
                "a ratio such as 0.5 or a percentage such as 50%",
            )

    def lowrank(self, lowrank: ir.LowRank) -> None:
        if lowrank.rank.value <= 0:
            self.error("rank must be positive", lowrank.rank.span, "a rank such as 16 or 32")
        if lowrank.finetune_steps is not None and lowrank.finetune_steps.value <= 0:
            self.error("finetune steps must be positive", lowrank.finetune_steps.span)

    # ---- ties, budgets, allocation ---------------------------------------------------------

    def ties(self, ties: Iterable[ir.Tie]) -> None:
        for tie in ties:
            self.pattern(tie.pattern)

    def limits(self, limits: Iterable[ir.Limit], targets: tuple[ir.Target, ...]) -> None:
        seen: dict[tuple[str, str | None], ir.Limit] = {}
        names = [t.name for t in targets]
        for limit in limits:
            self.limit(limit, names)
            target = limit.target.text if limit.target else (names[0] if len(names) == 1 else None)
            key = (limit.metric, target if limit.metric == "latency" else None)
            if key in seen:
                self.error(
                    f"{ir.METRIC_WORDS[limit.metric]} budget given twice",
                    limit.span,
                    notes=[Note("first given here", seen[key].span)],
                )
            seen[key] = limit

    def limit(self, limit: ir.Limit, targets: list[str]) -> None:
        units = ir.UNITS[limit.metric]
        name = ir.METRIC_WORDS[limit.metric]
        if limit.value.value <= 0:
            self.error(f"a {name} budget must be positive", limit.value.span)
        if limit.metric == "weight_bits":
            if limit.value.value > 32:
                self.error("average weight bits cannot exceed 32", limit.value.span)
        elif limit.unit is None and limit.metric != "bops":
            self.error(f"a {name} budget needs a unit", limit.value.span, ", ".join(units))
        elif limit.unit and limit.unit.text not in units:
            other = next((m for m, u in ir.UNITS.items() if limit.unit.text in u), None)
            why = f" ('{limit.unit.text}' measures {ir.METRIC_WORDS[other]})" if other else ""
            self.error(
                f"'{limit.unit.text}' is not a {name} unit{why}",
                limit.unit.span,
                ", ".join(units),
                help=did_you_mean(limit.unit.text, units),
            )
        if limit.metric != "latency":
            return
        if limit.target is not None and limit.target.text not in targets:
            self.error(
                f"no target named '{limit.target.text}'",
                limit.target.span,
                "a target of this spec" + (f": {', '.join(targets)}" if targets else ""),
                help=did_you_mean(limit.target.text, targets),
            )
        elif limit.target is None and len(targets) != 1:
            self.error(
                "say which target the latency is measured on",
                limit.span,
                help=f"add: on {targets[0]}"
                if targets
                else "declare a target, for instance: target onnx { device cpu }",
            )

    def allocate(self, allocate: ir.Allocate, has_candidates: bool, has_evaluate: bool) -> None:
        if allocate.strategy.text == "ilp":
            for option in (allocate.generations, allocate.offspring, allocate.fitness):
                if option is not None:
                    self.error(
                        "generations, offspring and fitness are options of allocate evolution",
                        option.span,
                    )
        for option in (allocate.generations, allocate.offspring):
            if option is not None and option.value < 1:
                self.error("must be at least 1", option.span)
        if not has_candidates:
            self.warning("nothing to allocate: no rule uses weight choose [...]", allocate.span)
        fitness = allocate.fitness
        if fitness is not None and fitness.text == "evaluate" and not has_evaluate:
            self.error(
                "fitness evaluate needs an evaluate statement",
                fitness.span,
                help='add: evaluate "model.py:score", or use fitness cosine or kl',
            )


def check(spec: ir.Spec) -> list[Diagnostic]:
    checker = Checker()
    if spec.model:
        checker.model(spec.model)
    if spec.calibration:
        checker.calibration(spec.calibration)
    for verify in spec.verify:
        checker.verify(verify, spec.calibration)
    if spec.evaluate:
        checker.evaluate(spec.evaluate)
    checker.targets(spec.targets)
    checker.rules(spec.rules)
    checker.ties(spec.ties)
    checker.limits(spec.limits, spec.targets)
    if spec.allocate:
        has_candidates = any(
            isinstance(s, ir.Weight) and s.candidates for r in spec.rules for s in r.settings
        )
        checker.allocate(spec.allocate, has_candidates, spec.evaluate is not None)
    return checker.diagnostics


_FIELD: dict[type, str] = {
    ir.Weight: "weight",
    ir.Activation: "activation",
    ir.Sparsity: "sparsity",
    ir.LowRank: "lora",
    ir.BiasCorrection: "bias correction",
    ir.CompensateNone: "compensate none",
    ir.Keep: "keep",
}

WEIGHT_FIELDS = ("format", *ir.WeightOptions.__dataclass_fields__)
ALL_FIELDS = frozenset(
    {f"weight.{k}" for k in WEIGHT_FIELDS} | {"activation", "sparsity", "lora", "bias correction"}
)


def _fields(settings: tuple[ir.Setting, ...]) -> set[str]:
    """The fields a rule sets: `keep` and `compensate none` set every field they clear."""
    fields: set[str] = set()
    for setting in settings:
        if isinstance(setting, ir.Keep):
            fields |= ALL_FIELDS
        elif isinstance(setting, ir.CompensateNone):
            fields |= {"lora", "bias correction"}
        elif isinstance(setting, ir.Weight):
            fields |= {f"weight.{k}" for k, v in _weight_fields(setting).items() if v is not None}
        else:
            fields.add(_FIELD[type(setting)])
    return fields


def _weight_fields(weight: ir.Weight) -> dict[str, object]:
    options = {k: getattr(weight.options, k) for k in ir.WeightOptions.__dataclass_fields__}
    return {"format": weight.format or weight.candidates, **options}


def _merged(base: ir.WeightOptions, override: ir.WeightOptions) -> ir.WeightOptions:
    """Candidate options over the options shared by the whole `choose` statement."""
    fields = ir.WeightOptions.__dataclass_fields__
    return ir.WeightOptions(
        **{
            k: getattr(override, k) if getattr(override, k) is not None else getattr(base, k)
            for k in fields
        }
    )


def _is_entry(text: str) -> bool:
    """'path/to/file.py:function' with an identifier after the colon."""
    file, _, function = text.rpartition(":")
    return file.endswith(".py") and function.isidentifier()
