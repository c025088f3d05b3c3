"""sensitivity: what each candidate of each choosing layer costs, and how much error it adds.

Every candidate goes through its layer's own passes (sparsify, quantize, compensate), exactly as
the compile runs them, on statistics of the float model's inputs (one parallel calibration). Its
error is, by the spec's `sensitivity`:

- `output` (default): trace(ΔW H ΔWᵀ), H = XᵀX / n, the layer's squared output error;
- `hessian`: HAWQ's Tr(G)/n ‖ΔW‖², G the Gauss-Newton Hessian of the model output with respect
  to the layer's weight, its trace estimated by Hutchinson probes (Jacobian-vector products);
- `metric`: the end-to-end loss when only this layer is compressed (CalibTIP): the drop of the
  spec's `evaluate` score, or without one, 1 - cosine with the float model on calibration rows.

Its costs are exact and additive: `size` the bytes the backend stores (codes, scales, zero points,
masks, low-rank factors, bias), `weight_bits` the bits of its codes and low-rank factors, `bops`
MACs x density x weight bits x activation bits, and with a latency budget `latency`, the change
in the layer's own time, measured alone on the target's runtime, against the float layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache as once
from functools import partial

import numpy as np
import torch

from qspec.compiler.capture import Graph, float_matrix, primary_tensor, weight_of
from qspec.compiler.costs import CostModel
from qspec.compiler.layercache import Entry, cost_model
from qspec.compiler.numerics import quantize
from qspec.compiler.qmodel import CompressedLayer, float_param_bytes
from qspec.compiler.resolve import LayerPlan
from qspec.compiler.source import Batch
from qspec.compiler.state import State, run_passes
from qspec.passes import PIPELINE, calibrate, reuse
from qspec.passes.allocate.budgets import bops, weight_bits
from qspec.passes.allocate.stitch import Stitched
from qspec.passes.obs import output_error

METRIC_SAMPLES = 64  # calibration rows per end-to-end measurement of `sensitivity metric`
HUTCHINSON_PROBES = 8
HUTCHINSON_ROWS = 8
OPTION = "option"  # the cache's kind for a candidate's error and costs


@dataclass
class Option:
    """One candidate of one layer, compressed and measured."""

    plan: LayerPlan  # the layer's plan with this candidate decided
    describe: str
    error: float
    costs: dict[str, float]  # metric -> this layer's share (base units)
    weight: np.ndarray  # the effective [rows, cols] weight, for end-to-end search


@dataclass
class Sensitivity:
    options: dict[str, list[Option]]  # choosing layer -> its candidates, in spec order
    measure: str
    seconds: float
    fixed: dict[str, float] = field(default_factory=dict)  # metric -> total of the rest


def measure(
    state: State,
    how: str,
    costs: CostModel,
    latency_shapes: dict[str, tuple[int, ...]] | None,
    log: Callable[[str], None],
) -> Sensitivity:
    """Compress every choosing layer with each of its candidates and measure them. With
    `latency_shapes` (layer -> input shape of the latency batch) latency is measured too.
    With a cache, each candidate's error and costs are cached by content (`_option_key`)."""
    start = time.perf_counter()
    choosing = tuple(n for n, p in state.plan.layers.items() if p.candidates)
    state = run_passes(state, [("calibrate", calibrate.run)], scope=choosing)
    float_module = state.graph.module
    score = once(partial(_scorer, state, how))  # built when an error is first measured
    traces = _traces(state, choosing) if how == "hessian" else {}
    options: dict[str, list[Option]] = {}
    for index, name in enumerate(choosing):
        log(f"sensitivity: {name} ({index + 1}/{len(choosing)})")
        layer_plan = state.plan.layers[name]
        module = float_module.get_submodule(name)
        original = float_matrix(layer_plan.layer, module)
        options[name] = []
        for candidate in layer_plan.candidates or ():
            plan = layer_plan.choose(candidate)
            compressed = compress(state, name, plan)
            weight = original if compressed is None else compressed.effective_weight()
            key = _option_key(state, name, plan, how, costs, traces.get(name))
            found = None if key is None else _load_option(state, key, name)
            if found is None:
                delta = original - weight
                if how == "hessian":
                    error = traces[name] * float((delta * delta).sum())
                elif how == "metric":
                    error = score()(name, weight)
                else:
                    error = _output_error(state, name, delta)
                found = error, layer_costs(plan, compressed, module, costs)
                if key is not None:
                    _save_option(state, key, found)
            error, spent = found[0], dict(found[1])
            if latency_shapes is not None:
                shape = latency_shapes[name]
                spent["latency"] = latency_delta(plan, compressed, module, shape, costs)
            options[name].append(Option(plan, candidate.describe(), error, spent, weight))
    return Sensitivity(options, how, time.perf_counter() - start)


def _output_error(state: State, name: str, delta: np.ndarray) -> float:
    """A layer's squared output error per calibration row, trace(ΔW H ΔWᵀ) with H = XᵀX / n.
    An embedding's input is indices, so it has no XᵀX: each row looks up one of its `rows`
    entries and, with every token equally likely, the mean error is ‖ΔW‖² / rows."""
    stats = state.stats[name]
    if stats.xtx is not None:
        return output_error(delta, stats.hessian)
    return output_error(delta, None) / max(state.graph.layers[name].rows, 1)


def _option_key(
    state: State, name: str, plan: LayerPlan, how: str, costs: CostModel, trace: float | None
) -> str | None:
    """What decides a candidate's error and costs: the layer's own key under the candidate's
    plan (weights, plan), its statistics (XᵀX weighs the error even where the plan's methods
    ignore it), the measure and the cost model. None without a cache, and for the scores of an
    `evaluate` entry: user code may read what no key sees."""
    if state.cache is None or (how == "metric" and state.spec.evaluate is not None):
        return None
    layer = reuse.key(state, name, plan)
    return state.cache.key(OPTION, layer, state.stats[name], how, cost_model(costs), trace)


def _load_option(state: State, key: str, name: str) -> tuple[float, dict[str, float]] | None:
    def decode(entry: Entry) -> tuple[float, dict[str, float]]:
        spent = entry.meta["costs"]
        return float(entry.meta["error"]), {metric: float(spent[metric]) for metric in spent}

    assert state.cache is not None
    return state.cache.load(OPTION, key, name, decode)


def _save_option(state: State, key: str, found: tuple[float, dict[str, float]]) -> None:
    assert state.cache is not None
    state.cache.save(OPTION, key, Entry({"error": found[0], "costs": found[1]}))


def _traces(state: State, names: Sequence[str]) -> dict[str, float]:
    """`_gauss_newton_traces`, cached by content (model and data are in every key)."""
    if state.cache is None:
        return _gauss_newton_traces(state, names)
    key = state.cache.key("traces", names, HUTCHINSON_PROBES, HUTCHINSON_ROWS)
    found = state.cache.load(
        "traces", key, "gauss-newton", lambda entry: {n: float(entry.meta[n]) for n in names}
    )
    if found is None:
        found = _gauss_newton_traces(state, names)
        state.cache.save("traces", key, Entry(found))
    return found


def compress(state: State, name: str, plan: LayerPlan) -> CompressedLayer | None:
    """The layer compressed by its own passes under `plan` (None when the plan keeps it float),
    on the statistics `state` already holds for it."""
    after_calibration = [(step, run) for step, run in PIPELINE if run is not calibrate.run]
    single = run_passes(state.for_layer(name, plan), after_calibration, scope=(name,))
    return single.qmodel.get(name)


# ---- costs ---------------------------------------------------------------------------------


def layer_costs(
    plan: LayerPlan,
    compressed: CompressedLayer | None,
    module: torch.nn.Module,
    costs: CostModel,
) -> dict[str, float]:
    """Bytes (as the backend stores them), weight bits and BOPs of one layer as planned."""
    size = float_param_bytes(module)
    if compressed is not None:
        size = costs.stored_bytes(compressed, module)
    return {"size": float(size), "weight_bits": weight_bits(plan), "bops": bops(plan)}


def latency_delta(
    plan: LayerPlan,
    compressed: CompressedLayer | None,
    module: torch.nn.Module,
    shape: tuple[int, ...],
    costs: CostModel,
) -> float:
    """Seconds this layer adds (or saves) against its float self, each run alone on the
    target's runtime on its input of the latency batch."""
    if compressed is None:
        return 0.0
    own = costs.layer_latency(plan.layer, module, compressed, shape, describe(plan))
    return own - costs.layer_latency(plan.layer, module, None, shape, "float")


def describe(plan: LayerPlan) -> str:
    """The plan's cache key for latency: everything that changes the emitted kernels."""
    return plan.describe() + f", activation {plan.activation}" * bool(plan.activation)


def layer_inputs(graph: Graph, names: Sequence[str], batch: Batch) -> dict[str, tuple[int, ...]]:
    """Each layer's input shape when the float model runs `batch`."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable:
        def hook(_module, inputs, _output) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))

        return hook

    hooks = [graph.module.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            graph.module(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def stand_in(plan: LayerPlan, module: torch.nn.Module) -> CompressedLayer | None:
    """A layer compressed as planned but rounded to nearest, with placeholder factors and
    scales: bytes and speed depend on the plan and shapes, not on the values, so this predicts
    both without running the passes."""
    if not plan.compressed:
        return None
    layer = plan.layer
    weight = float_matrix(layer, module)
    bias = getattr(module, "bias", None)
    compressed = CompressedLayer(
        layer=layer,
        plan=plan,
        weight=quantize(weight, plan.weight.quantizer) if plan.weight else None,
        float_weight=weight,
        mask=np.ones(weight.shape, bool) if plan.sparsity else None,
        bias=None if bias is None else bias.detach().float().numpy(),
        activation=plan.activation,
    )
    if plan.lowrank is not None and plan.weight is not None:
        rank = plan.lowrank.rank
        up = np.full((layer.rows, rank), 1e-3, np.float32)
        down = np.full((rank, layer.cols), 1e-3, np.float32)
        compressed.lowrank = (up.astype(np.float16), down.astype(np.float16))
    if plan.activation and not plan.activation.dynamic:
        compressed.activation_scale, compressed.activation_zero_point = 1.0, 0
        compressed.output_scale, compressed.output_zero_point = 1.0, 0
    return compressed


# ---- end-to-end sensitivities ------------------------------------------------------------


def _scorer(state: State, how: str) -> Callable[[str, np.ndarray], float]:
    """For `sensitivity metric`: the end-to-end loss with only one layer's weight replaced: the
    drop of the evaluate score, or without an evaluate entry 1 - cosine with the float model on
    the first METRIC_SAMPLES calibration rows."""
    if how != "metric":
        return lambda _name, _weight: 0.0
    stitched = Stitched(state)
    samples = min(METRIC_SAMPLES, stitched.samples)
    if stitched.evaluate is not None:
        baseline = stitched.score()

        def loss() -> float:
            return baseline - stitched.score()
    else:

        def loss() -> float:
            return 1.0 - stitched.agreement("cosine", samples)

    def replaced(name: str, weight: np.ndarray) -> float:
        stitched.put(name, weight)
        try:
            return loss()
        finally:
            stitched.reset(name)

    return replaced


def _gauss_newton_traces(state: State, names: Sequence[str]) -> dict[str, float]:
    """Tr(G)/n per layer, G = JᵀJ the Gauss-Newton Hessian of the model output with respect to
    the layer's weight, by Hutchinson's estimator Tr(G) = E‖J v‖² with Rademacher v."""
    module = state.graph.module
    first = state.calibration.batches[0]
    batch = {k: v[:HUTCHINSON_ROWS] for k, v in first.items()}
    generator = torch.Generator().manual_seed(0)
    traces = {}
    for name in names:
        key = f"{name}.weight"
        weight = weight_of(module.get_submodule(name)).detach()

        def output(w: torch.Tensor, key: str = key) -> torch.Tensor:
            out = torch.func.functional_call(module, {key: w}, args=(), kwargs=batch)
            return primary_tensor(out).float()

        total = 0.0
        for _ in range(HUTCHINSON_PROBES):
            probe = torch.randint(0, 2, weight.shape, generator=generator).to(weight.dtype)
            tangent = torch.func.jvp(output, (weight,), (2 * probe - 1,))[1]
            total += float(tangent.detach().double().square().sum())
        traces[name] = total / HUTCHINSON_PROBES / weight.numel()
    return traces
