"""reuse: take each layer's compressed result from the layer cache when it holds one.

`lookup` runs after calibrate: every layer in scope whose `CompressedLayer` is cached goes
straight into `state.qmodel`, and the scope narrows to the others, which sparsify, quantize and
compensate then compute; `store`, after them, caches those. A result is keyed by everything that
decides it (`key`): the layer's float weight and bias, its module's settings, its resolved plan
and the statistics calibration measured for it. In sequential mode those statistics carry the
blocks before it, so an edited layer recomputes itself and the blocks after it, nothing else.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
from torch import nn

from qspec.compiler.capture import float_matrix, weight_of
from qspec.compiler.layercache import Entry
from qspec.compiler.numerics import Quantized, QuantSpec
from qspec.compiler.qmodel import CompressedLayer
from qspec.compiler.resolve import LayerPlan
from qspec.compiler.state import State
from qspec.dsl.formats import WEIGHT_FORMATS
from qspec.passes.methods import needs_hessian

KIND = "layer"


def lookup(state: State) -> State:
    if state.cache is None:
        return state
    left = []
    for name, plan in state.plan.layers.items():
        if not (plan.compressed or plan.bias_correction) or not state.in_scope(name):
            continue
        module = state.graph.module.get_submodule(name)
        state.pending[name] = key(state, name, plan)
        decode = partial(_compressed, plan=plan, module=module)
        compressed = state.cache.load(KIND, state.pending[name], name, decode)
        if compressed is None:
            left.append(name)
        else:
            state.qmodel[name] = compressed
            del state.pending[name]
    state.scope = tuple(left)
    return state


def store(state: State) -> State:
    if state.cache is not None:
        for name, result in state.pending.items():
            compressed = state.qmodel.get(name)
            if compressed is not None:
                state.cache.save(KIND, result, _entry(compressed, name in state.weights))
    state.pending.clear()
    return state


def key(state: State, name: str, plan: LayerPlan) -> str:
    """What decides the layer's result under `plan`, hashed (needs `state.cache`). XᵀX counts
    only when the plan's methods read it (`needs_hessian`): sensitivity measures candidates on
    statistics with XᵀX, and a candidate that ignores it must find its result there."""
    assert state.cache is not None
    module = state.graph.module.get_submodule(name)
    bias = getattr(module, "bias", None)
    stats = state.stats.get(name)
    if stats is not None and not needs_hessian(plan):
        stats = replace(stats, xtx=None)
    return state.cache.key(KIND, plan, repr(module), weight_of(module), bias, stats)


def _entry(compressed: CompressedLayer, own_weight: bool) -> Entry:
    """`own_weight`: the float weight is the sparsify pass's (pruned, maybe updated), not the
    module's, and is stored too."""
    quantized = compressed.weight
    arrays = {
        "codes": None if quantized is None else quantized.codes,
        "scales": None if quantized is None else quantized.scales,
        "zero_points": None if quantized is None else quantized.zero_points,
        "float_weight": compressed.float_weight if own_weight else None,
        "mask": compressed.mask,
        "up": None if compressed.lowrank is None else compressed.lowrank[0],
        "down": None if compressed.lowrank is None else compressed.lowrank[1],
        "bias": compressed.bias,
    }
    spec = None if quantized is None else quantized.spec
    meta = {
        "quantizer": None
        if spec is None
        else {
            "format": spec.format.name,
            "granularity": spec.granularity,
            "group_size": spec.group_size,
            "symmetric": spec.symmetric,
            "scale_format": spec.scale_format,
        },
        "activation_scale": compressed.activation_scale,
        "activation_zero_point": compressed.activation_zero_point,
        "output_scale": compressed.output_scale,
        "output_zero_point": compressed.output_zero_point,
        "notes": compressed.notes,
    }
    return Entry(meta, {name: array for name, array in arrays.items() if array is not None})


def _compressed(entry: Entry, plan: LayerPlan, module: nn.Module) -> CompressedLayer:
    """The layer an entry holds; ValueError when its arrays do not fit the layer."""
    meta, arrays = entry.meta, entry.arrays
    rows, cols = plan.layer.rows, plan.layer.cols
    quantized = None
    if meta["quantizer"] is not None:
        settings = dict(meta["quantizer"])
        spec = QuantSpec(WEIGHT_FORMATS[settings.pop("format")], **settings)
        blocks = (rows, spec.n_blocks(cols))
        _fits(arrays, "codes", (rows, cols), np.uint8)
        _fits(arrays, "scales", blocks, np.float32)
        if "zero_points" in arrays:
            _fits(arrays, "zero_points", blocks, np.uint8)
        quantized = Quantized(arrays["codes"], arrays["scales"], arrays.get("zero_points"), spec)
    for name, shape in (("float_weight", (rows, cols)), ("mask", (rows, cols)), ("bias", (rows,))):
        if name in arrays:
            _fits(arrays, name, shape, bool if name == "mask" else np.float32)
    float_weight = arrays.get("float_weight")
    up, down = arrays.get("up"), arrays.get("down")
    if up is not None and down is not None and (up.shape[0], down.shape[1]) != (rows, cols):
        raise ValueError("low-rank factors of another shape")
    return CompressedLayer(
        layer=plan.layer,
        plan=plan,
        weight=quantized,
        float_weight=float_matrix(plan.layer, module) if float_weight is None else float_weight,
        mask=arrays.get("mask"),
        lowrank=None if up is None or down is None else (up, down),
        bias=arrays.get("bias"),
        activation=plan.activation,
        activation_scale=meta["activation_scale"],
        activation_zero_point=meta["activation_zero_point"],
        output_scale=meta["output_scale"],
        output_zero_point=meta["output_zero_point"],
        notes=list(meta["notes"]),
    )


def _fits(arrays: dict[str, np.ndarray], name: str, shape: tuple[int, ...], dtype) -> None:
    if arrays[name].shape != shape or arrays[name].dtype != dtype:
        raise ValueError(f"{name} is {arrays[name].dtype} {arrays[name].shape}, not {shape}")
