"""The pass interface and driver: each pass is a function from State to State.

Passes run in the declared order of `passes.PIPELINE`; each reads the plan, the graph and the
statistics of earlier passes and returns the state updated. Passes never import each other.

In sequential mode the driver runs the whole pipeline once per block of layers (`state.scope`),
and substitutes each finished block's compressed weights into `state.working`, so the next
block is calibrated on the inputs it will see in the compressed model.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qspec.compiler.capture import Graph, Layer, unmatrix
from qspec.compiler.qmodel import QModel
from qspec.compiler.resolve import Plan
from qspec.compiler.source import CalibrationData
from qspec.dsl import ir


@dataclass
class State:
    spec: ir.Spec
    graph: Graph
    plan: Plan
    calibration: CalibrationData
    working: torch.nn.Module  # the model passes calibrate on (earlier blocks compressed)
    scope: tuple[str, ...] | None = None  # the layers of the current block (None: all)
    block: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # per layer, written by calibrate
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # float [rows, cols] by sparsify
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # kept weights, by sparsify
    qmodel: QModel = field(default_factory=dict)  # per compressed layer, written by quantize
    timings: dict[str, float] = field(default_factory=dict)

    def in_scope(self, name: str) -> bool:
        return self.scope is None or name in self.scope


Pass = Callable[[State], State]


def run_passes(state: State, passes: Sequence[tuple[str, Pass]], sequential: bool) -> State:
    blocks = blocks_of(state) if sequential else [("", None)]
    for block, scope in blocks:
        state.block, state.scope = block, scope
        for name, run in passes:
            start = time.perf_counter()
            state = run(state)
            state.timings[name] = state.timings.get(name, 0.0) + time.perf_counter() - start
        if sequential:
            substitute(state, scope or ())
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
    """Put the compressed layers' effective weights (and corrected biases) into `working`."""
    modules = dict(state.working.named_modules())
    for name in names:
        compressed = state.qmodel.get(name)
        if compressed is None:
            continue
        assign_weight(modules[name], compressed.layer, compressed.effective_weight())
        if compressed.bias is not None and getattr(modules[name], "bias", None) is not None:
            with torch.no_grad():
                modules[name].bias.copy_(torch.from_numpy(compressed.bias))


def assign_weight(module: torch.nn.Module, layer: Layer, weight: np.ndarray) -> None:
    """Overwrite a layer's weight in place with a [rows, cols] matrix."""
    with torch.no_grad():
        module.weight.copy_(unmatrix(layer, torch.from_numpy(weight)).to(module.weight.dtype))
