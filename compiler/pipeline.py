"""The pass interface and driver: each pass is a function from State to State.

Passes run in the declared order of `passes.PIPELINE`; each reads the plan, the graph and the
statistics of earlier passes and returns the state updated. Passes never import each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qspec.compiler.capture import Graph
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
    stats: dict[str, Any] = field(default_factory=dict)  # per layer, written by calibrate
    qmodel: QModel = field(default_factory=dict)  # per compressed layer, written by quantize
    timings: dict[str, float] = field(default_factory=dict)


Pass = Callable[[State], State]


def run_passes(state: State, passes: Sequence[tuple[str, Pass]]) -> State:
    for name, run in passes:
        start = time.perf_counter()
        state = run(state)
        state.timings[name] = time.perf_counter() - start
    return state
