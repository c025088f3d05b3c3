"""The backend-neutral compressed model: per layer, what the artifact must compute.

A `CompressedLayer` holds the quantized weight (codes, scales, zero points), the sparsity mask,
low-rank factors, the bias and the activation quantizer. Backends read only this (and the float
module for everything that is not compressed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from qspec.compiler.capture import Layer
from qspec.compiler.numerics import Quantized, QuantSpec
from qspec.compiler.resolve import ActivationPlan, LayerPlan
from qspec.dsl.formats import WEIGHT_FORMATS

# `compensate lora ... factors int8`: each factor symmetric int8 with one fp32 scale per row.
FACTOR_SPEC = QuantSpec(WEIGHT_FORMATS["int8"], "channel")


@dataclass
class CompressedLayer:
    layer: Layer
    plan: LayerPlan
    weight: Quantized | None  # None: the weight stays float (possibly masked)
    float_weight: np.ndarray  # [rows, cols] float32: the original weight
    mask: np.ndarray | None = None  # bool [rows, cols], True = kept
    lowrank: tuple[np.ndarray, np.ndarray] | None = None  # (up [rows, r], down [r, cols]) fp16
    bias: np.ndarray | None = None  # float32 [rows]
    activation: ActivationPlan | None = None
    activation_scale: float | None = None  # static activation quantization, per tensor
    activation_zero_point: int | None = None
    output_scale: float | None = None  # static: the output's calibrated scale (QLinearConv)
    output_zero_point: int | None = None
    notes: list[str] = field(default_factory=list)  # decisions worth reporting (searched format)

    def compressed_weight(self) -> np.ndarray:
        """[rows, cols] float32: the quantized (or masked float) weight, before low rank."""
        if self.weight is not None:
            return self.weight.dequantize()
        return self.float_weight if self.mask is None else self.float_weight * self.mask

    def effective_weight(self) -> np.ndarray:
        """[rows, cols] float32 weight the artifact multiplies with (low-rank branch included)."""
        weight = self.compressed_weight()
        if self.lowrank is not None:
            up, down = self.lowrank
            weight = weight + up.astype(np.float32) @ down.astype(np.float32)
        return weight.astype(np.float32)

    @property
    def density(self) -> float:
        """Measured fraction of nonzero weights in the compressed (pre-low-rank) weight."""
        weight = self.compressed_weight()
        return float(np.count_nonzero(weight)) / weight.size


QModel = dict[str, CompressedLayer]


def float_param_bytes(module: nn.Module) -> int:
    """Bytes of a layer's own parameters in float32: what it stores when left uncompressed."""
    return sum(p.numel() * 4 for p in module.parameters(recurse=False))


def factor_bytes(rows: int, cols: int, rank: int, factors: str) -> int:
    """Stored bytes of `B` `[rows, rank]` and `A` `[rank, cols]`.

    fp16: 2 bytes an element. int8: 1 byte an element plus one fp32 scale per row of each factor
    (`rows + rank` scales).
    """
    elements = rank * (rows + cols)
    if factors == "fp16":
        return 2 * elements
    if factors == "int8":
        return elements + 4 * (rows + rank) if rank else 0
    raise ValueError(f"unknown factor format {factors!r}: expected 'fp16' or 'int8'")
