"""The pass interface: each pass is a function from State to State, run by `run_passes`.

Passes run in the declared order of `passes.PIPELINE`; each reads the plan, the graph and the
statistics of earlier passes and returns the state updated. Passes never import each other.

In sequential mode the driver runs the whole pipeline once per block of layers (`state.scope`),
and substitutes each finished block's compressed weights into `state.working`, so the next
block is calibrated on the inputs it will see in the compressed model.

With a `LayerCache`, calibration keys each layer's statistics by `state.working_digest` (what
has been written into `working`), and the compressing passes are skipped for every layer whose
result is cached (`passes.reuse`).
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qspec.compiler.capture import Graph, Layer, unmatrix, weight_of
from qspec.compiler.histogram import Histogram
from qspec.compiler.layercache import LayerCache, digest
from qspec.compiler.qmodel import QModel
from qspec.compiler.resolve import LayerPlan, Plan
from qspec.compiler.source import CalibrationData
from qspec.dsl import ir


@dataclass
class LayerStats:
    """What calibration measured of one layer's inputs and outputs, in bounded memory."""

    samples: int = 0  # rows of X seen
    input_min: float = float("inf")
    input_max: float = float("-inf")
    output_min: float = float("inf")
    output_max: float = float("-inf")
    input_sum: np.ndarray | None = None  # [cols] float64
    xtx: np.ndarray | None = None  # [cols, cols] float64, sum over rows of x xᵀ
    # value histograms, for layers whose activations are quantized on a static range
    input_histogram: Histogram | None = None
    output_histogram: Histogram | None = None

    @property
    def mean_input(self) -> np.ndarray:
        assert self.input_sum is not None
        return self.input_sum / max(self.samples, 1)

    @property
    def hessian(self) -> np.ndarray:
        """XᵀX / n: the H of GPTQ, SparseGPT and EoRA (the layer's output-error metric)."""
        assert self.xtx is not None
        return self.xtx / max(self.samples, 1)

    @property
    def input_norms(self) -> np.ndarray:
        """‖X_j‖₂ of every input column: Wanda's activation factor."""
        assert self.xtx is not None
        return np.sqrt(np.diag(self.xtx))


@dataclass
class State:
    """What flows through the passes. Passes write only their own fields: calibrate `stats`,
    sparsify `weights` and `masks`, quantize and compensate `qmodel`."""

    spec: ir.Spec
    graph: Graph
    plan: Plan
    calibration: CalibrationData
    working: torch.nn.Module  # the model passes calibrate on (earlier blocks compressed)
    scope: tuple[str, ...] | None = None  # the layers of the current block (None: all)
    block: str = ""
    stats: dict[str, LayerStats] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # float [rows, cols]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # bool [rows, cols], True = kept
    qmodel: QModel = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cache: LayerCache | None = None  # None: compute everything (`--no-cache`)
    working_digest: str = ""  # of the compressed layers written into `working` ("": none)
    pending: dict[str, str] = field(default_factory=dict)  # layer -> cache key of its result

    @classmethod
    def start(
        cls,
        spec: ir.Spec,
        graph: Graph,
        plan: Plan,
        calibration: CalibrationData,
        *,
        sequential: bool = False,
        cache: LayerCache | None = None,
    ) -> State:
        """A fresh state. Sequential runs calibrate on a copy of the model into which each
        finished block's compressed weights are written; others on the float model itself."""
        working = copy.deepcopy(graph.module) if sequential else graph.module
        return cls(spec, graph, plan, calibration, working, cache=cache)

    def for_layer(self, name: str, plan: LayerPlan) -> State:
        """A state for one layer compressed under `plan`, on the statistics already held."""
        return State(
            self.spec,
            self.graph,
            Plan({name: plan}, []),
            self.calibration,
            self.working,
            stats={name: self.stats[name]},
            cache=self.cache,
        )

    def in_scope(self, name: str) -> bool:
        return self.scope is None or name in self.scope

    def hessian(self, name: str) -> np.ndarray | None:
        """The layer's H = XᵀX / n, or None when calibration did not collect it (no method
        needed it, or its rows share no input: grouped Conv, Embedding)."""
        stats = self.stats.get(name)
        return stats.hessian if stats is not None and stats.xtx is not None else None


Pass = Callable[[State], State]


def run_passes(
    state: State,
    passes: Sequence[tuple[str, Pass]],
    *,
    sequential: bool = False,
    scope: tuple[str, ...] | None = None,
) -> State:
    """Run the passes over `scope` (every layer when None), or block by block when
    `sequential`, writing each finished block into `state.working`."""
    blocks = blocks_of(state) if sequential else [("", scope)]
    for block, layers in blocks:
        state.block, state.scope = block, layers
        for name, run in passes:
            start = time.perf_counter()
            state = run(state)
            state.timings[name] = state.timings.get(name, 0.0) + time.perf_counter() - start
        if sequential:
            substitute(state, layers or ())
    state.block, state.scope = "", None
    return state


def blocks_of(state: State) -> list[tuple[str, tuple[str, ...]]]:
    """Compressed layers grouped into blocks: the path up to the first numbered component
    (`bert.encoder.layer.3`), in order of appearance; other layers are blocks of their own."""
    blocks: dict[str, list[str]] = {}
    for name, plan in state.plan.layers.items():
        if plan.compressed or plan.bias_correction:
            match = re.match(r"(.*?\.\d+)(\.|$)", name)
            blocks.setdefault(match.group(1) if match else name, []).append(name)
    return [(key, tuple(names)) for key, names in blocks.items()]


def substitute(state: State, names: Sequence[str]) -> None:
    """Put the compressed layers' effective weights (and corrected biases) into `working`, and
    fold what was written into `state.working_digest`."""
    modules = dict(state.working.named_modules())
    for name in names:
        compressed = state.qmodel.get(name)
        if compressed is None:
            continue
        weight = compressed.effective_weight()
        assign_weight(modules[name], compressed.layer, weight)
        bias = None
        if compressed.bias is not None and getattr(modules[name], "bias", None) is not None:
            bias = compressed.bias
            with torch.no_grad():
                modules[name].bias.copy_(torch.from_numpy(bias))
        if state.cache is not None:
            state.working_digest = digest(state.working_digest, name, weight, bias)


def assign_weight(module: torch.nn.Module, layer: Layer, weight: np.ndarray) -> None:
    """Overwrite a layer's weight in place with a [rows, cols] matrix."""
    target = weight_of(module)
    with torch.no_grad():
        target.copy_(unmatrix(layer, torch.from_numpy(weight)).to(target.dtype))
