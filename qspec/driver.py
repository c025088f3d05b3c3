"""`qspec compile`: spec -> model -> capture -> plan -> passes -> artifact -> verify -> folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from qspec import report
from qspec.backends import backend, cost_model
from qspec.backends.base import Artifact
from qspec.build import fidelity_floors_missed
from qspec.buildcache import action_key, tool_versions
from qspec.compiler.cache import cache_dir
from qspec.compiler.capture import Graph, capture
from qspec.compiler.errors import CompileFailure, UserError
from qspec.compiler.folder import (
    FORMAT_VERSION,
    MANIFEST,
    check_replaceable,
    check_writable,
    output_folder,
    read_manifest,
    sha256_file,
    staged,
    write_json,
)
from qspec.compiler.inputs import Recording, build_inputs, recording, relative_to
from qspec.compiler.layercache import open_cache
from qspec.compiler.qmodel import float_param_bytes
from qspec.compiler.resolve import Plan, explain, print_warnings, resolve
from qspec.compiler.source import (
    Batch,
    CalibrationData,
    LoadedModel,
    load_calibration,
    load_model,
    resolve_path,
)
from qspec.compiler.state import State, run_passes
from qspec.compiler.timing import median_seconds
from qspec.dsl import ir
from qspec.dsl.diagnostics import SpecError
from qspec.dsl.load import check_file
from qspec.passes import PIPELINE, methods
from qspec.passes.allocate import Allocation, allocate_plan, choosing
from qspec.passes.allocate.budgets import (
    EXACT,
    SIZE_ATTEMPTS,
    check_budgets,
    size_excess,
    tightened,
)
from qspec.passes.allocate.sensitivity import Sensitivity
from qspec.runtime import open_target
from qspec.verify import Fidelity, artifact_outputs, end_to_end, per_layer

DEFAULT_TARGET = ir.Target(ir.Word("onnx"))


@dataclass
class Build:
    """What a compile produced: the folder, its manifest and report, and measured numbers."""

    out_dir: Path
    manifest: dict
    report: dict
    fidelity: Fidelity | None  # of the first listed target that ran here
    timings: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)  # every file the build read


def compile_spec(
    spec_path: str | Path,
    out_dir: str | Path,
    *,
    fail_under: dict[str, float] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Build:
    checked = check_file(spec_path)
    spec = checked.raise_errors()
    try:
        out = output_folder(out_dir)
        check_replaceable(out, [Path(path) for path in spec.files])
        check_writable(out)
        with recording() as read:
            prepared = prepare(spec, log, read)
            _check_top1_floor(prepared, fail_under or {})
            return compile_prepared(prepared, out, spec.limits, fail_under or {}, log)
    except UserError as error:
        raise SpecError([error.diagnostic], checked.sources) from error


def explain_spec(spec_path: str | Path, build_dir: str | Path | None = None) -> str:
    """The per-layer table of `qspec explain` (loads and captures the model, runs no pass).
    With the folder of a build of this spec, choosing layers show the candidate they got."""
    checked = check_file(spec_path)
    spec = checked.raise_errors()
    chosen = _choices(spec, Path(build_dir)) if build_dir is not None else {}
    try:
        model = load_model(_model_of(spec))
        plan = resolve(spec, capture(model, _model_of(spec).path))
        print_warnings(plan)
    except UserError as error:
        raise SpecError([error.diagnostic], checked.sources) from error
    return explain(plan, chosen)


def _choices(spec: ir.Spec, folder: Path) -> dict[str, str]:
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 0 < version <= FORMAT_VERSION:
        raise UserError(f"{folder} holds a build format this qspec does not read ({version!r:.40})")
    try:
        built_from = manifest["spec"]["path"]
        if Path(built_from).name != Path(spec.path).name:
            raise UserError(f"{folder} was built from {built_from}, not {spec.path}")
        return {
            entry["name"]: f"{entry['choice']['candidate']} (chosen, "
            f"{entry['choice']['index'] + 1} of {entry['choice']['of']})"
            for entry in manifest["layers"]
            if "choice" in entry
        }
    except (KeyError, TypeError, IndexError) as error:
        raise UserError(f"{folder}/{MANIFEST} is damaged (no {error})") from None


def _check_top1_floor(prepared: Prepared, fail_under: dict[str, float]) -> None:
    """A top-1 floor needs labels: without them it could only ever fail, after the build."""
    if {"top1", "top1_agreement"} & set(fail_under) and prepared.calibration.holdout_labels is None:
        calibration = prepared.spec.calibration
        raise UserError(
            "--fail-under top1 needs labels, and the held-out data has none",
            calibration.span if calibration else None,
            help="add a 'labels' array of class indices to the calibration file",
        )


def _model_of(spec: ir.Spec) -> ir.ModelSource:
    if spec.model is None:
        raise UserError(
            "compiling needs a model",
            ir.Span(spec.path, 1, 1, 1, 1),
            help='add: model "model.py:load"',
        )
    return spec.model


@dataclass
class Prepared:
    """A spec's model, data, capture and plan: what every build of one spec shares (a sweep
    builds many), with the candidates' sensitivity once measured."""

    spec: ir.Spec
    model: LoadedModel
    calibration: CalibrationData
    graph: Graph
    plan: Plan
    timings: dict[str, float]
    sensitivity: Sensitivity | None = None
    read: Recording | None = None  # the files user code reads, while the build runs


def prepare(
    spec: ir.Spec, log: Callable[[str], None] = lambda _: None, read: Recording | None = None
) -> Prepared:
    clock = _Clock(log)
    model = load_model(_model_of(spec))
    calibration = load_calibration(spec.calibration, model, _model_of(spec).path, spec.verify)
    clock.lap("load")
    graph = capture(model, _model_of(spec).path)
    plan = resolve(spec, graph)
    print_warnings(plan)
    clock.lap("capture and resolve")
    return Prepared(spec, model, calibration, graph, plan, clock.timings, read=read)


def named_inputs(spec: ir.Spec) -> list[Path]:
    """The files the spec names: itself, its includes, the Python files of its entries, the
    calibration arrays and the model file or folder."""
    named = [Path(path) for path in spec.files]
    words = [spec.evaluate.entry] if spec.evaluate else []
    if spec.model is not None:
        words.append(spec.model.path)
    if spec.calibration is not None:
        words += [source.path for source in spec.calibration.sources]
    words += [verify.source for verify in spec.verify]
    for word in words:
        file, colon, _ = word.text.rpartition(":")
        entry = bool(colon) and file.endswith(".py")  # "file.py:function"
        named.append(resolve_path(word, file) if entry else resolve_path(word))
    return [path for path in named if path.exists()]


def compile_prepared(
    prepared: Prepared,
    out_dir: Path,
    limits: Sequence[ir.Limit],
    fail_under: dict[str, float],
    log: Callable[[str], None] = lambda _: None,
) -> Build:
    """Allocate, run the passes, emit, verify and write one build folder."""
    spec, graph, calibration = prepared.spec, prepared.graph, prepared.calibration
    clock = _Clock(log, dict(prepared.timings))
    largest = max(calibration.holdout, key=lambda b: next(iter(b.values())).numel())
    primary, *others = spec.targets or (DEFAULT_TARGET,)
    requested, limits, reserve = list(limits), list(limits), 0
    with staged(out_dir) as stage:
        for attempt in range(SIZE_ATTEMPTS):
            allocation = _allocate(prepared, limits, largest, log)
            clock.lap("allocate")
            plan = allocation.plan if allocation else prepared.plan
            state = _run_passes(prepared, plan, log, clock)
            artifact = _emit(graph, state.qmodel, primary, stage, {})
            clock.lap(f"emit {primary.name}")
            over = size_excess(requested, artifact.total_bytes)
            if over <= 0 or allocation is None or attempt == SIZE_ATTEMPTS - 1:
                break
            # The graph's own bytes for the chosen kernels were not predicted: hold them back.
            reserve = max(reserve, artifact.total_bytes - int(allocation.predicted["size"]))
            log(f"the artifact is {over} bytes over the size budget: allocating again")
            limits = [tightened(limit, reserve) for limit in requested]
        artifacts = {primary.name: artifact}
        emitted = {primary.backend.text: artifact}
        for target in others:
            artifacts[target.name] = _emit(graph, state.qmodel, target, stage, emitted)
            clock.lap(f"emit {target.name}")
        entries = [_target_entry(t, artifacts[t.name], stage) for t in (primary, *others)]
        verified = _verify(graph, calibration, entries, stage, largest)
        # The report's fidelity: the first listed target that could run here.
        fidelity = next((c.fidelity for c in verified.values() if c.fidelity), None)
        for why in fidelity.unresolved_sources() if fidelity else ():
            log(f"warning: {why}")
        for entry in entries:
            entry.update(verified[entry["name"]].record())
        lowered = artifact.module
        layer_errors = per_layer(
            graph.module,
            {n: lowered.get_submodule(n) for n in state.qmodel},
            calibration.holdout,
            {n: graph.layers[n].clamp for n in state.qmodel},
        )
        clock.lap("verify")
        latency = {
            f"{name} batch {len(next(iter(largest.values())))}": check.latency_ms
            for name, check in verified.items()
            if check.latency_ms is not None
        }
        manifest = _manifest(spec, prepared.model, calibration, graph, state, artifact, entries)
        seconds = {
            name: None if check.latency_ms is None else check.latency_ms / 1e3
            for name, check in verified.items()
        }
        budgets = check_budgets(requested, state, artifact.total_bytes, seconds, allocation)
        if allocation is not None:
            manifest["allocation"] = allocation.record
            _mark_choices(manifest, allocation)
        if budgets:
            manifest["budgets"] = budgets
        for entry in budgets:
            if not entry["met"] and entry["metric"] == "latency":
                log(f"warning: {entry['limit']} not met here: measured {entry['measured']}")
        # strict JSON: non-finite numbers as "inf"/"-inf"/"nan" in the report and manifest alike
        body = report.json_safe(
            report.assemble(manifest, fidelity, layer_errors, graph.method, graph.note)
        )
        _fail_if_short(fidelity, fail_under, budgets)  # before the folder replaces the old one
        inputs = _inputs(prepared, (stage, out_dir, cache_dir()))
        spec_dir = Path(spec.path).resolve().parent
        specs = {Path(path).resolve() for path in spec.files}  # keyed by their IR instead
        manifest["inputs"] = {
            relative_to(path, spec_dir): sha256_file(path) for path in inputs if path not in specs
        }
        write_json(stage / "report.json", body)
        (stage / "report.md").write_text(report.markdown(body))
        report.bits_chart(manifest, stage / "bits.png")
        manifest["files"] = {
            path.relative_to(stage).as_posix(): sha256_file(path)
            for path in sorted(stage.rglob("*"))
            if path.is_file()
        }
        manifest = report.json_safe(manifest)
        write_json(stage / MANIFEST, manifest)
    return Build(out_dir, manifest, body, fidelity, clock.timings, latency, inputs)


def _fail_if_short(
    fidelity: Fidelity | None, fail_under: dict[str, float], budgets: list[dict]
) -> None:
    """A CompileFailure naming each --fail-under floor and exact budget the build missed."""
    below = fidelity_floors_missed(fidelity.as_dict() if fidelity else None, fail_under)
    missed = [
        f"{b['limit']} (measured {b['measured']})"
        for b in budgets
        if not b["met"] and b["metric"] in EXACT
    ]
    worst = fidelity.worst_output() if fidelity else None
    which = (
        f" (the worst of {len(fidelity.outputs)} outputs: {worst})" if fidelity and worst else ""
    )
    failed = ["fidelity below --fail-under: " + ", ".join(below) + which] * bool(below)
    failed += ["budget not met: " + ", ".join(missed)] * bool(missed)
    if failed:
        raise CompileFailure("; ".join(failed) + "; the previous build, if any, is unchanged")


def _inputs(prepared: Prepared, own_folders: Sequence[Path]) -> list[Path]:
    """Every file the build read: what the spec names and what its entries opened, without
    what qspec itself wrote (the build folder, its staging folder, the cache)."""
    record = prepared.read
    read, modules = (set(record.opened), record.modules()) if record else (set(), set())
    own = [folder.resolve() for folder in own_folders]
    inputs = [
        path
        for path in build_inputs(read, [*named_inputs(prepared.spec), *modules])
        if not any(path.is_relative_to(folder) for folder in own)
    ]
    changed = record.changed(inputs) if record else []
    if changed:
        raise UserError(
            f"{changed[0]} changed while it was being built from; the previous build stays",
            help="compile again once the inputs are in their final state",
        )
    return inputs


def _mark_choices(manifest: dict, allocation: Allocation) -> None:
    """Each choosing layer's manifest entry names the candidate it got."""
    entries = {entry["name"]: entry for entry in manifest["layers"]}
    for layer in allocation.record["layers"]:
        chosen = layer["candidates"][layer["chosen"]]
        entries[layer["name"]]["choice"] = {
            "index": layer["chosen"],
            "of": len(layer["candidates"]),
            "candidate": chosen["candidate"],
        }


class _Clock:
    """Stage timings, logged as they end."""

    def __init__(self, log: Callable[[str], None], timings: dict[str, float] | None = None):
        self.log, self.timings = log, timings if timings is not None else {}
        self.start = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        seconds, self.start = now - self.start, now
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self.log(f"{stage}: {seconds:.1f} s")


def _allocate(
    prepared: Prepared, limits: Sequence[ir.Limit], batch: Batch, log: Callable[[str], None]
) -> Allocation | None:
    """Decide the spec's `weight choose` layers, priced by `backends.cost_model()`."""
    if not choosing(prepared.plan):
        return None
    cache = open_cache(prepared.model, prepared.calibration)
    state = State.start(
        prepared.spec, prepared.graph, prepared.plan, prepared.calibration, cache=cache
    )
    allocation, prepared.sensitivity = allocate_plan(
        state, limits, cost_model(), log, prepared.sensitivity, batch
    )
    for line in cache.summary() if cache else ():
        log(line)
    return allocation


def _run_passes(prepared: Prepared, plan: Plan, log: Callable[[str], None], clock: _Clock) -> State:
    sequential = _sequential(prepared.spec, plan)
    cache = open_cache(prepared.model, prepared.calibration)
    state = State.start(
        prepared.spec,
        prepared.graph,
        plan,
        prepared.calibration,
        sequential=sequential,
        cache=cache,
    )
    state = run_passes(state, PIPELINE, sequential=sequential)
    log(f"calibration: {'sequential, block by block' if sequential else 'parallel'}")
    for line in cache.summary() if cache else ():
        log(line)
    for name, seconds in state.timings.items():
        clock.timings[f"pass {name}"] = clock.timings.get(f"pass {name}", 0.0) + seconds
        log(f"pass {name}: {seconds:.1f} s")
    clock.start = time.perf_counter()
    return state


def _sequential(spec: ir.Spec, plan: Plan) -> bool:
    """Block-by-block calibration through already-compressed blocks: the spec's `mode`, else
    whenever a layer's methods ask for it (GPTQ, SparseGPT: updates for the inputs they will
    see)."""
    mode = spec.calibration.mode if spec.calibration else None
    if mode is not None:
        return mode.text == "sequential"
    return methods.sequential(list(plan.layers.values()))


def _emit(graph: Graph, qmodel, target: ir.Target, stage: Path, emitted: dict) -> Artifact:
    """One target's artifact: ONNX once for all onnx targets (the device only picks the
    runtime's provider), TVM in the target's own folder."""
    name = target.backend.text
    if name == "onnx" and "onnx" in emitted:
        return emitted["onnx"]
    artifact = backend(name).emit(graph, qmodel, target, stage)
    if name == "onnx":
        emitted["onnx"] = artifact
    return artifact


def _target_entry(target: ir.Target, artifact: Artifact, stage: Path) -> dict:
    return {"backend": target.backend.text, "name": target.name} | artifact.entry(target, stage)


@dataclass
class _Check:
    """A target's artifact run on the held-out data, or why it was not."""

    fidelity: Fidelity | None
    latency_ms: float | None
    skipped: str | None = None

    def record(self) -> dict:
        if self.fidelity is None:
            return {"verified": False, "skipped": self.skipped}
        return {"verified": True, "fidelity": self.fidelity.as_dict()}


def _verify(graph: Graph, calibration, entries: list[dict], stage: Path, batch: Batch) -> dict:
    """Each target's fidelity against the float model and latency on the largest batch; a
    CUDA artifact on a machine without a GPU was compiled, not run."""
    checks: dict[str, _Check] = {}
    done: dict[str, _Check] = {}  # by file: targets sharing one ONNX file are checked once
    for entry in entries:
        if entry["file"] in done:
            checks[entry["name"]] = done[entry["file"]]
            continue
        if entry["device"] == "cuda" and not backend(entry["backend"]).cuda_available():
            checks[entry["name"]] = _Check(None, None, "no GPU on the build machine")
            continue
        runner = open_target(stage, entry, list(graph.example), threads=1)
        fidelity = end_to_end(
            graph.module,
            artifact_outputs(runner),
            calibration.holdout,
            calibration.holdout_labels,
            groups=calibration.groups,
        )
        feed = {name: batch[name].numpy() for name in runner.input_names}
        checks[entry["name"]] = done[entry["file"]] = _Check(
            fidelity, median_seconds(partial(runner, feed)) * 1e3
        )
    return checks


def _manifest(spec, model, calibration, graph, state: State, artifact, targets: list) -> dict:
    spec_dir = Path(spec.path).resolve().parent
    files = [
        {"path": relative_to(Path(path).resolve(), spec_dir), "sha256": sha256_file(Path(path))}
        for path in spec.files
    ]
    layers = report.layer_entries(graph, state, artifact)
    # What the artifact must hold besides the compressed layers: its other stored tensors.
    other = artifact.other_bytes()
    compressed = [entry for entry in layers if entry["name"] in state.qmodel]
    float_bytes = other + sum(
        float_param_bytes(graph.module.get_submodule(e["name"])) for e in compressed
    )
    minimum = other + sum(entry["min_bytes"] for entry in compressed)
    return {
        "format_version": FORMAT_VERSION,
        "spec": {"path": Path(spec.path).name, "files": files},
        "build": {"key": action_key(spec)},
        "model": {
            "source": spec.model.path.text,
            "kind": spec.model.kind,
            "sha256": model.sha256,
            "capture": graph.method,
            "inputs": {
                name: {
                    "dtype": str(t.dtype).replace("torch.", ""),
                    "dims": t.dim(),
                    "shape": [
                        None if axis in graph.free_axes.get(name, ()) else size
                        for axis, size in enumerate(t.shape)
                    ],
                }
                for name, t in graph.example.items()
            },
            "folded": [{"layer": f.layer, "batchnorm": f.norm} for f in graph.folded],
            "unfolded": [{"batchnorm": u.norm, "reason": u.reason} for u in graph.unfolded],
            "rewritten": [{"module": r.module, "into": r.into} for r in graph.rewritten],
            "left_float": [{"module": f.module, "reason": f.reason} for f in graph.left_float],
        },
        "calibration": {
            "sources": [s.path.text for s in spec.calibration.sources] if spec.calibration else [],
            "verify": [v.source.text for v in spec.verify],
            "sha256": calibration.sha256,
            "samples": calibration.samples,
            "holdout": sum(len(next(iter(b.values()))) for b in calibration.holdout),
        },
        "tools": tool_versions(),
        "targets": targets,
        "layers": layers,
        "totals": {
            "artifact_bytes": artifact.total_bytes,
            "float_bytes": float_bytes,
            "min_bytes": int(minimum),
            "artifact_to_min": round(artifact.total_bytes / minimum, 4),
            "float_to_artifact": round(float_bytes / artifact.total_bytes, 3),
        },
    }
