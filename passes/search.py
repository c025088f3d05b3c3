"""Quantizer search: the quantizer's free parameters chosen per layer by the layer's output
error on the calibration data, tr(ΔW H ΔWᵀ), rather than by the plain weight error.

- `search clip`: a clipping ratio per block from CLIP_RATIOS (outliers clamped for a finer grid).
- `search format`: the exponent/mantissa split of a float format of the layer's width (fp4
  e2m1, e1m2 or e3m0; fp8 e4m3 or e5m2), as LLM-FP4 (Liu et al. 2023) searches it.
"""

from __future__ import annotations

import numpy as np

from qspec.compiler.numerics import QuantSpec, quantize
from qspec.dsl.formats import FLOAT_FAMILIES, WEIGHT_FORMATS
from qspec.passes.obs import output_error

CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.7, 13), 3))


def search_format(
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
        per_block = delta.reshape(rows, blocks, block)
        errors.append(np.einsum("rbi,bij,rbj->rb", per_block, diagonal, per_block))
    choice = np.asarray(CLIP_RATIOS)[np.argmin(np.stack(errors), axis=0)]
    if spec.granularity == "tensor":
        total = np.stack(errors).sum(axis=(1, 2))
        choice = np.full((rows, 1), CLIP_RATIOS[int(np.argmin(total))])
    return choice
