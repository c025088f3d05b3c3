"""calibrate: stream the calibration batches through the float model and record, per layer,
the ranges of its input and output (for static activation scales), in bounded memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qspec.compiler.pipeline import State


@dataclass
class LayerStats:
    input_min: float = float("inf")
    input_max: float = float("-inf")
    output_min: float = float("inf")
    output_max: float = float("-inf")
    samples: int = 0

    def update(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        self.input_min = min(self.input_min, float(inputs.min()))
        self.input_max = max(self.input_max, float(inputs.max()))
        self.output_min = min(self.output_min, float(output.min()))
        self.output_max = max(self.output_max, float(output.max()))
        self.samples += len(inputs)


def run(state: State) -> State:
    wanted = {name for name, plan in state.plan.layers.items() if plan.compressed}
    if not wanted:
        return state
    module = state.graph.module
    stats = {name: LayerStats() for name in wanted}
    hooks = []
    for name, child in module.named_modules():
        if name in stats:

            def hook(_module, inputs, output, layer_stats: LayerStats = stats[name]) -> None:
                layer_stats.update(inputs[0].detach().float(), output.detach().float())

            hooks.append(child.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in state.calibration.batches:
                module(**batch)
    finally:
        for handle in hooks:
            handle.remove()
    state.stats.update(stats)
    return state
