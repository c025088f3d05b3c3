"""The backend-neutral compressed model: per layer, what the artifact must compute.

A `CompressedLayer` holds the quantized weight (codes, scales, zero points), the sparsity mask,
low-rank factors, the bias and the activation quantizer. Backends read only this (and the float
module for everything that is not compressed).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from qspec.compiler.capture import Layer, unmatrix
from qspec.compiler.formats import weight_format
from qspec.compiler.numerics import Quantized, QuantSpec
from qspec.compiler.resolve import ActivationPlan, LayerPlan, WeightPlan


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


def quant_spec(plan: WeightPlan) -> QuantSpec:
    fmt = weight_format(plan.format)
    assert fmt is not None
    return QuantSpec(
        format=fmt,
        granularity=plan.granularity,  # type: ignore[arg-type]
        group_size=plan.group_size,
        symmetric=plan.symmetric,
        scale_format=plan.scale_format,  # type: ignore[arg-type]
    )


QModel = dict[str, CompressedLayer]


Lowering = Callable[[CompressedLayer, nn.Module], tuple[nn.Module, str]]


def lowered_module(module: nn.Module, qmodel: QModel, lower: Lowering) -> tuple[nn.Module, dict]:
    """A copy of the float module with every compressed layer replaced by what a backend's
    `lower` makes of it, and what each became."""
    module = copy.deepcopy(module)
    emitted: dict[str, str] = {}
    for name, compressed in qmodel.items():
        replacement, what = lower(compressed, module.get_submodule(name))
        module.set_submodule(name, replacement)
        emitted[name] = what
    return module.eval(), emitted


def sparse_float(compressed: CompressedLayer, original: nn.Module) -> nn.Module:
    """The layer itself with its pruned (and SparseGPT-updated) weight: the zeros are stored."""
    module = copy.deepcopy(original)
    weight = torch.from_numpy(compressed.effective_weight())
    with torch.no_grad():
        module.weight.copy_(unmatrix(compressed.layer, weight))
    return module
