"""`qspec compile`: spec -> model -> capture -> plan -> passes -> artifact -> verify -> folder."""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import onnx
import torch

from qspec.backends.onnx.export import emit
from qspec.backends.runtime import OnnxRunner
from qspec.compiler import report
from qspec.compiler.build import FORMAT_VERSION, sha256_file, staged, write_json
from qspec.compiler.capture import capture
from qspec.compiler.errors import CompileFailure, UserError
from qspec.compiler.pipeline import State, run_passes
from qspec.compiler.resolve import explain, resolve
from qspec.compiler.source import load_calibration, load_model
from qspec.compiler.verify import Fidelity, end_to_end, per_layer
from qspec.dsl import ir
from qspec.dsl.diagnostics import SpecError
from qspec.dsl.load import check_file
from qspec.passes import PIPELINE

TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "lark", "transformers")
DEFAULT_TARGET = ir.Target(ir.Word("onnx"))


@dataclass
class Build:
    """What a compile produced: the folder, its manifest and report, and measured numbers."""

    out_dir: Path
    manifest: dict
    report: dict
    fidelity: Fidelity
    timings: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)


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
        return _compile(spec, Path(out_dir), fail_under or {}, log)
    except UserError as error:
        raise SpecError([error.diagnostic], checked.sources) from error


def explain_spec(spec_path: str | Path) -> str:
    """The per-layer table of `qspec explain` (loads and captures the model, runs no pass)."""
    checked = check_file(spec_path)
    spec = checked.raise_errors()
    try:
        model = load_model(_model_of(spec))
        return explain(resolve(spec, capture(model, spec.model.path if spec.model else None)))
    except UserError as error:
        raise SpecError([error.diagnostic], checked.sources) from error


def _model_of(spec: ir.Spec) -> ir.ModelSource:
    if spec.model is None:
        raise UserError(
            "compiling needs a model",
            ir.Span(spec.path, 1, 1, 1, 1),
            help='add: model "model.py:load"',
        )
    return spec.model


def _compile(spec: ir.Spec, out_dir: Path, fail_under: dict[str, float], log) -> Build:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now
        log(f"{stage}: {timings[stage]:.1f} s")

    for target in spec.targets:
        if target.backend.text != "onnx":
            raise UserError(
                f"the {target.backend.text} backend is not available in this build",
                target.backend.span,
                help="compile for target onnx",
            )
    model = load_model(_model_of(spec))
    calibration = load_calibration(spec.calibration, model, _model_of(spec).path)
    lap("load")
    graph = capture(model, spec.model.path)
    plan = resolve(spec, graph)
    lap("capture and resolve")
    sequential = _sequential(spec, plan)
    working = copy.deepcopy(graph.module) if sequential else graph.module
    state = run_passes(State(spec, graph, plan, calibration, working), PIPELINE, sequential)
    log(f"calibration: {'sequential, block by block' if sequential else 'parallel'}")
    for name, seconds in state.timings.items():
        timings[f"pass {name}"] = seconds
        log(f"pass {name}: {seconds:.1f} s")
    clock = time.perf_counter()
    target = spec.targets[0] if spec.targets else DEFAULT_TARGET
    with staged(out_dir) as stage:
        artifact = emit(graph, state.qmodel, target, stage / "model.onnx")
        lap("emit onnx")
        runner = OnnxRunner(artifact.path, threads=1)
        fidelity = end_to_end(
            graph.module, runner.primary, calibration.holdout, calibration.holdout_labels
        )
        lowered = artifact.module
        layer_errors = per_layer(
            graph.module, {n: lowered.get_submodule(n) for n in state.qmodel}, calibration.holdout
        )
        lap("verify")
        largest = max(calibration.holdout, key=lambda b: next(iter(b.values())).numel())
        latency = _latency(OnnxRunner(artifact.path), largest)
        manifest = _manifest(spec, model, calibration, graph, state, artifact, target)
        body = report.build(manifest, fidelity, layer_errors, graph.method, graph.note)
        write_json(stage / "manifest.json", manifest)
        write_json(stage / "report.json", body)
        (stage / "report.md").write_text(report.markdown(body))
    build = Build(out_dir, manifest, body, fidelity, timings, latency)
    failed = [
        f"{name} {fidelity.metric(name)} < {floor}"
        for name, floor in fail_under.items()
        if (fidelity.metric(name) or 0.0) < floor
    ]
    if failed:
        raise CompileFailure("fidelity below --fail-under: " + ", ".join(failed))
    return build


def _sequential(spec: ir.Spec, plan) -> bool:
    """Block-by-block calibration through already-compressed blocks: the spec's `mode`, else on
    whenever a layer uses GPTQ or SparseGPT (whose updates assume the inputs they will see)."""
    mode = spec.calibration.mode if spec.calibration else None
    if mode is not None:
        return mode.text == "sequential"
    return any(
        (p.weight and p.weight.rounding == "gptq")
        or (p.sparsity and p.sparsity.method == "sparsegpt")
        for p in plan.layers.values()
    )


def _latency(
    runner: OnnxRunner, batch: dict[str, torch.Tensor], runs: int = 10
) -> dict[str, float]:
    """Median latency of the artifact on one held-out batch (printed, never written: it varies)."""
    inputs = {k: v.numpy() for k, v in batch.items()}
    runner(inputs)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(inputs)
        samples.append(time.perf_counter() - start)
    rows = len(next(iter(inputs.values())))
    return {f"onnx batch {rows}": statistics.median(samples) * 1e3}


def _manifest(spec, model, calibration, graph, state: State, artifact, target: ir.Target) -> dict:
    files = [{"path": path, "sha256": sha256_file(Path(path))} for path in spec.files]
    layers = report.layer_entries(graph, state, artifact)
    # What the artifact must hold besides the compressed layers: its other initializers.
    other = _uncompressed_bytes(artifact.path, state.qmodel)
    compressed = [entry for entry in layers if entry["name"] in state.qmodel]
    float_bytes = other + sum(
        report.float_param_bytes(graph.module.get_submodule(e["name"])) for e in compressed
    )
    minimum = other + sum(entry["min_bytes"] for entry in compressed)
    return {
        "format_version": FORMAT_VERSION,
        "spec": {"path": spec.path, "files": files},
        "model": {
            "source": spec.model.path.text,
            "kind": spec.model.kind,
            "sha256": model.sha256,
            "capture": graph.method,
            "inputs": {
                name: {"dtype": str(t.dtype).replace("torch.", ""), "dims": t.dim()}
                for name, t in graph.example.items()
            },
        },
        "calibration": {
            "source": spec.calibration.source.text if spec.calibration else None,
            "sha256": calibration.sha256,
            "samples": calibration.samples,
            "holdout": sum(len(next(iter(b.values()))) for b in calibration.holdout),
        },
        "tools": {
            "qspec": _version("qspec"),
            "python": platform.python_version(),
            **{tool: _version(tool) for tool in TOOLS},
        },
        "targets": [
            {
                "backend": "onnx",
                "name": target.name,
                "device": target.device.text if target.device else "cpu",
                "opset": int(target.opset.value) if target.opset else 21,
                "file": artifact.path.name,
                "bytes": artifact.total_bytes,
                "sha256": sha256_file(artifact.path),
            }
        ],
        "layers": layers,
        "totals": {
            "artifact_bytes": artifact.total_bytes,
            "float_bytes": float_bytes,
            "min_bytes": int(minimum),
            "artifact_to_min": round(artifact.total_bytes / minimum, 4),
            "float_to_artifact": round(float_bytes / artifact.total_bytes, 3),
        },
    }


def _uncompressed_bytes(path: Path, qmodel) -> int:
    """Bytes of the artifact's initializers that belong to no compressed layer."""
    model = onnx.load(str(path))
    owned = tuple(f"{name}." for name in qmodel)
    return sum(
        onnx.numpy_helper.to_array(t).nbytes
        for t in model.graph.initializer
        if not t.name.startswith(owned)
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
