"""quantize: round every planned weight onto its format's grid.

Rounding by the layer's method in `methods.ROUNDING`: nearest, or GPTQ (`gptq.py`; jointly
with a SparseGPT mask when the layer also asks for sparsegpt), after the quantizer search of
`search.py` (`search clip`, `search format`).
Static activation scales come from the calibration ranges: the input's, and the output's for
backends whose integer kernels requantize their output (QLinearConv).
"""

from __future__ import annotations

import numpy as np

from qspec.compiler.capture import float_matrix
from qspec.compiler.errors import UserError
from qspec.compiler.numerics import Quantized, quantize_values, round_scales
from qspec.compiler.qmodel import CompressedLayer
from qspec.compiler.resolve import ActivationPlan, LayerPlan
from qspec.compiler.state import State
from qspec.dsl.formats import WEIGHT_FORMATS
from qspec.passes.methods import ROUNDING, joint_pattern
from qspec.passes.ranges import activation_range
from qspec.passes.search import search_clip, search_format

INT8_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def run(state: State) -> State:
    modules = dict(state.graph.module.named_modules())
    for name, plan in state.plan.layers.items():
        if not (plan.compressed or plan.bias_correction) or not state.in_scope(name):
            continue
        if plan.candidates:
            raise UserError(
                f"{name} has candidates but nothing chose among them",
                plan.sources.get("weight"),
                help="add an allocate statement and budgets",
            )
        module = modules[name]
        original = float_matrix(plan.layer, module)
        weight = state.weights.get(name, original)
        stats = state.stats.get(name)
        hessian = state.hessian(name)
        notes: list[str] = []
        mask = state.masks.get(name)
        quantized = None
        if plan.weight is not None:
            quantized, joint_mask = _round(plan, weight, hessian, notes, mask)
            mask = joint_mask if joint_mask is not None else mask
        bias = getattr(module, "bias", None)
        compressed = CompressedLayer(
            layer=plan.layer,
            plan=plan,
            weight=quantized,
            float_weight=weight,
            mask=mask,
            bias=None if bias is None else bias.detach().float().numpy(),
            activation=plan.activation,
            notes=notes,
        )
        if plan.activation and not plan.activation.dynamic:
            assert stats is not None
            activation = plan.activation
            method = (activation.calibrate, activation.percentile)
            low, high = activation_range(
                *method, stats.input_min, stats.input_max, stats.input_histogram
            )
            compressed.activation_scale, compressed.activation_zero_point = static_scale(
                activation, low, high
            )
            bottom, top = plan.layer.clamp or (-np.inf, np.inf)  # quantized after the clamp
            low, high = activation_range(
                *method,
                float(np.clip(stats.output_min, bottom, top)),
                float(np.clip(stats.output_max, bottom, top)),
                stats.output_histogram,
            )
            compressed.output_scale, compressed.output_zero_point = static_scale(
                activation, low, high
            )
            compressed.weight = _bias_in_int32(compressed)
        state.qmodel[name] = compressed
    return state


def _round(
    plan: LayerPlan,
    weight: np.ndarray,
    hessian: np.ndarray | None,
    notes: list[str],
    mask: np.ndarray | None,
) -> tuple[Quantized, np.ndarray | None]:
    """The quantized weight and, when the layer's pruning is solved jointly with its rounding,
    the mask chosen with it. A mask from the sparsify pass is kept: its zeros stay zero."""
    assert plan.weight is not None
    quantizer = plan.weight.quantizer
    if "format" in plan.weight.search:
        quantizer = search_format(quantizer, weight, hessian, plan.weight.search)
        notes.append(f"search format chose {quantizer.format.name}")
    clip: float | np.ndarray = 1.0
    if "clip" in plan.weight.search:
        clip = search_clip(weight, quantizer, hessian)
        notes.append(f"search clip: mean ratio {float(np.mean(clip)):.3f}")
    rounding = ROUNDING[plan.weight.rounding].apply
    rounded = rounding(weight, quantizer, hessian, clip, plan.weight, mask, joint_pattern(plan))
    notes.extend(rounded.warnings)
    return rounded.quantized, rounded.mask


def _bias_in_int32(compressed: CompressedLayer) -> Quantized | None:
    """The weight, with a larger scale on each channel whose bias would overflow int32.

    Integer kernels add the bias as int32 codes at scale s_in * s_w. A channel whose weights are
    nearly zero (a BatchNorm with gamma near 0 folded into it) gets s_w so small that its bias
    saturates, and the channel outputs about 0 instead of its bias; the smallest scale that
    holds the bias (with a factor 2 of margin) rounds those tiny weights instead."""
    quantized, bias, scale = compressed.weight, compressed.bias, compressed.activation_scale
    if quantized is None or bias is None or scale is None or quantized.zero_points is not None:
        return quantized
    if quantized.spec.granularity != "channel" or quantized.spec.format.is_float:
        return quantized
    needed = (np.abs(bias.astype(np.float64)) / (scale * 2**30)).astype(np.float32)
    short = quantized.scales[:, 0] < needed
    if not short.any():
        return quantized
    scales = quantized.scales.copy()
    scales[short, 0] = round_scales(needed[short], quantized.spec.scale_format, "up")
    codes = quantized.codes.copy()
    rows = compressed.float_weight[short]
    codes[short] = quantize_values(rows, scales[short], quantized.spec)
    return Quantized(codes, scales, None, quantized.spec)


def static_scale(plan: ActivationPlan, low: float, high: float) -> tuple[float, int]:
    """Scale and zero point that map [low, high] (widened to hold 0) onto the int8 grid, or for
    fp8 the absolute maximum onto the format's largest value (zero point 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    if plan.format not in INT8_RANGE:
        bound = max(-low, high)
        largest = WEIGHT_FORMATS[plan.format].max_value
        return float(np.float32(bound / largest if bound > 0 else 1.0)), 0
    qmin, qmax = INT8_RANGE[plan.format]
    if plan.symmetric:
        bound = max(-low, high)
        scale = bound / ((qmax - qmin) / 2) if bound > 0 else 1.0
        return float(np.float32(scale)), 0 if plan.format == "int8" else 128
    scale = (high - low) / (qmax - qmin) if high > low else 1.0
    zero = int(np.clip(round(qmin - low / scale), qmin, qmax))
    return _inside(np.float32(scale), zero, qmin, qmax, low, high), zero


def _inside(scale: np.float32, zero: int, qmin: int, qmax: int, low: float, high: float) -> float:
    """The float32 scale, lowered by ulps until the grid's ends lie inside [low, high] in
    float32: ONNX Runtime drops a ReLU6 before a QuantizeLinear only when the grid's top is
    not above 6, and rounding 6 / 255 to float32 rounds it up."""
    ends = np.array([qmin - zero, qmax - zero], dtype=np.float32)
    while scale > 0 and not (low <= scale * ends[0] and scale * ends[1] <= high):
        scale = np.nextafter(scale, np.float32(0))
    return float(scale)
