"""quantize: round every planned weight onto its format's grid.

Rounding: nearest, or GPTQ (Frantar et al. 2022; jointly with a SparseGPT mask when the layer
also asks for sparsegpt). Quantizer search, by the layer's output error on the calibration data
trace(ΔW H ΔWᵀ) rather than the plain weight error: `search clip` picks a clipping ratio per
block, `search format` the exponent/mantissa split of fp formats (LLM-FP4, Liu et al. 2023).
Static activation scales come from the calibration ranges: the input's, and the output's for
backends whose integer kernels requantize their output (QLinearConv).
"""

from __future__ import annotations

import numpy as np

from qspec.compiler.capture import matrix
from qspec.compiler.errors import UserError
from qspec.compiler.formats import FLOAT_FAMILIES, WEIGHT_FORMATS
from qspec.compiler.numerics import Quantized, QuantSpec, quantize
from qspec.compiler.obs import output_error, solve
from qspec.compiler.pipeline import State
from qspec.compiler.qmodel import CompressedLayer, quant_spec
from qspec.compiler.resolve import ActivationPlan, LayerPlan

INT8_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}
CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.7, 13), 3))


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
        original = matrix(plan.layer, module.weight.detach().float()).numpy()
        weight = state.weights.get(name, original)
        stats = state.stats.get(name)
        hessian = stats.hessian if stats is not None and stats.xtx is not None else None
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
            compressed.activation_scale, compressed.activation_zero_point = static_scale(
                plan.activation, stats.input_min, stats.input_max
            )
            compressed.output_scale, compressed.output_zero_point = static_scale(
                plan.activation, stats.output_min, stats.output_max
            )
        state.qmodel[name] = compressed
    return state


def _round(
    plan: LayerPlan,
    weight: np.ndarray,
    hessian: np.ndarray | None,
    notes: list[str],
    mask: np.ndarray | None,
) -> tuple[Quantized, np.ndarray | None]:
    """The quantized weight and, in SparseGPT's joint mode, the mask chosen with it. A mask from
    the sparsify pass is kept: GPTQ leaves its zeros at zero."""
    assert plan.weight is not None
    spec = quant_spec(plan.weight)
    if "format" in plan.weight.search:
        spec = _search_format(spec, weight, hessian, plan.weight.search)
        notes.append(f"search format chose {spec.format.name}")
    clip: float | np.ndarray = 1.0
    if "clip" in plan.weight.search:
        clip = search_clip(weight, spec, hessian)
        notes.append(f"search clip: mean ratio {float(np.mean(clip)):.3f}")
    joint = plan.sparsity if plan.sparsity and plan.sparsity.method == "sparsegpt" else None
    if plan.weight.rounding != "gptq":
        return quantize(weight, spec, clip), None
    if hessian is None:
        notes.append("GPTQ needs one input shared by all rows: rounded to nearest instead")
        return quantize(weight, spec, clip), None
    sparsity = None
    if joint is not None:
        sparsity = (joint.n, joint.m) if joint.m is not None else joint.ratio
    result = solve(
        weight,
        hessian,
        spec=spec,
        sparsity=sparsity,
        percdamp=plan.weight.damp,
        actorder=plan.weight.actorder,
        clip=clip,
        keep=mask if sparsity is None else None,
    )
    notes.extend(result.warnings)
    assert result.quantized is not None
    return result.quantized, result.mask


def _search_format(
    spec: QuantSpec, weight: np.ndarray, hessian: np.ndarray | None, search: tuple[str, ...]
) -> QuantSpec:
    """The float format of this width (e.g. fp4 e2m1, e1m2, e3m0) with the least output error,
    each with its own best clipping when clip is searched too."""
    best: tuple[float, QuantSpec] | None = None
    for name in FLOAT_FAMILIES[spec.format.bits]:
        candidate = QuantSpec(
            WEIGHT_FORMATS[name], spec.granularity, spec.group_size, True, spec.scale_format
        )
        clip = search_clip(weight, candidate, hessian) if "clip" in search else 1.0
        delta = weight - quantize(weight, candidate, clip).dequantize()
        error = output_error(delta, hessian)
        if best is None or error < best[0]:
            best = (error, candidate)
    assert best is not None
    return best[1]


def search_clip(weight: np.ndarray, spec: QuantSpec, hessian: np.ndarray | None) -> np.ndarray:
    """Per-block clipping ratios [rows, n_blocks] minimising each block's output error, with H
    restricted to the block's columns (its cross-block terms are dropped)."""
    rows, cols = weight.shape
    block = spec.block_size(cols)
    blocks = spec.n_blocks(cols)
    width = blocks * block
    padded_h = np.zeros((width, width))
    padded_h[:cols, :cols] = hessian if hessian is not None else np.eye(cols)
    diagonal = np.stack(
        [padded_h[b * block : (b + 1) * block, b * block : (b + 1) * block] for b in range(blocks)]
    )
    errors = []
    for ratio in CLIP_RATIOS:
        delta = np.zeros((rows, width))
        delta[:, :cols] = weight - quantize(weight, spec, float(ratio)).dequantize()
        delta = delta.reshape(rows, blocks, block)
        errors.append(np.einsum("rbi,bij,rbj->rb", delta, diagonal, delta))
    choice = np.asarray(CLIP_RATIOS)[np.argmin(np.stack(errors), axis=0)]
    if spec.granularity == "tensor":
        total = np.stack(errors).sum(axis=(1, 2))
        choice = np.full((rows, 1), CLIP_RATIOS[int(np.argmin(total))])
    return choice


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
        zero = 0 if plan.format == "int8" else 128
    else:
        scale = (high - low) / (qmax - qmin) if high > low else 1.0
        zero = int(np.clip(round(qmin - low / scale), qmin, qmax))
    return float(np.float32(scale)), zero
