"""quantize: round every planned weight to its format (round-to-nearest), and fix static
activation scales from the calibration ranges."""

from __future__ import annotations

import numpy as np

from qspec.compiler.capture import matrix
from qspec.compiler.numerics import quantize as quantize_weight
from qspec.compiler.pipeline import State
from qspec.compiler.qmodel import CompressedLayer, quant_spec
from qspec.compiler.resolve import ActivationPlan

INT8_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def run(state: State) -> State:
    modules = dict(state.graph.module.named_modules())
    for name, plan in state.plan.layers.items():
        if not plan.compressed:
            continue
        module = modules[name]
        weight = matrix(plan.layer, module.weight.detach().float()).numpy()
        quantized = quantize_weight(weight, quant_spec(plan.weight)) if plan.weight else None
        bias = getattr(module, "bias", None)
        compressed = CompressedLayer(
            layer=plan.layer,
            plan=plan,
            weight=quantized,
            float_weight=weight,
            bias=None if bias is None else bias.detach().float().numpy(),
            activation=plan.activation,
        )
        if plan.activation and not plan.activation.dynamic:
            stats = state.stats[name]
            compressed.activation_scale, compressed.activation_zero_point = static_scale(
                plan.activation, stats.input_min, stats.input_max
            )
        state.qmodel[name] = compressed
    return state


def static_scale(plan: ActivationPlan, low: float, high: float) -> tuple[float, int]:
    """Scale and zero point that map [low, high] (widened to hold 0) onto the int8 grid."""
    qmin, qmax = INT8_RANGE[plan.format]
    low, high = min(low, 0.0), max(high, 0.0)
    if plan.symmetric:
        bound = max(-low, high)
        scale = bound / ((qmax - qmin) / 2) if bound > 0 else 1.0
        zero = 0 if plan.format == "int8" else 128
    else:
        scale = (high - low) / (qmax - qmin) if high > low else 1.0
        zero = int(np.clip(round(qmin - low / scale), qmin, qmax))
    return float(np.float32(scale)), zero
