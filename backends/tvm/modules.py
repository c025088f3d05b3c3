"""Lowering for TVM: each CompressedLayer becomes a small torch module calling one packed custom
operator (`ops`), whose stored tensors are frozen `nn.Parameter`s so the Relax importer lifts
them into the parameter file instead of baking them into the library.

| layer            | weight                          | kernel                                  |
|------------------|---------------------------------|-----------------------------------------|
| Linear, Conv1D   | any format, any granularity,    | packed_linear: decode per column tile   |
|                  | dense or N:M (codes of the kept | inside the matmul                       |
|                  | elements plus their positions)  |                                         |
| Conv1d, Conv2d   | same (groups 1)                 | packed_conv: the same, over kernel      |
|                  |                                 | positions x input channels              |
| Embedding        | same                            | packed_embedding: only looked-up rows   |
| any, float       | N:M pruned                      | as above, with float32 kept values      |
| any, float       | unstructured pruned             | the float layer, zeros stored           |

A low-rank branch adds x Aᵀ Bᵀ: fp16 factors cast in the graph, int8 ones as two packed_linear
calls. Quantized activations have no TVM kernel here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qspec.backends import lowering
from qspec.backends.lowering import sparse_float, with_lowrank
from qspec.backends.tvm import ops  # noqa: F401  (registers the custom operators)
from qspec.backends.tvm.layout import Packed, nm_pattern, pack_layer, pack_quantized
from qspec.compiler.errors import UserError
from qspec.compiler.numerics import quantize
from qspec.compiler.qmodel import FACTOR_SPEC, CompressedLayer


def lower(compressed: CompressedLayer, original: nn.Module) -> tuple[nn.Module, str]:
    """The module that replaces a compressed layer, and what it runs."""
    if compressed.activation is not None:
        why = "the TVM backend runs weight-only formats: compile this layer for target onnx"
        raise unsupported(compressed, "activation", "quantized activations", why)
    return with_lowrank("tvm", compressed, _lower_main(compressed, original), LowRankBranch)


def unsupported(compressed: CompressedLayer, field: str, what: str, why: str) -> UserError:
    return lowering.unsupported("tvm", compressed, field, what, why)


def _lower_main(compressed: CompressedLayer, original: nn.Module) -> tuple[nn.Module, str]:
    if compressed.weight is None and (compressed.mask is None or nm_pattern(compressed) is None):
        if compressed.mask is None:
            return original, "float"
        return sparse_float(compressed, original), "float (sparse: zeros stored)"
    packed = pack_layer(compressed)
    kind = compressed.layer.kind
    if kind.startswith("conv"):
        options = conv_options(original)
        if options is None:
            why = "packed convolutions take groups 1 and zero padding given as numbers"
            raise unsupported(compressed, "weight", "this convolution", why)
        module: nn.Module = PackedConv(packed, compressed.bias, options)
    elif kind == "embedding":
        module = PackedEmbedding(packed)
    else:
        module = PackedLinear(packed, compressed.bias)
    return module, _describe(packed, kind)


def _describe(packed: Packed, kind: str) -> str:
    meta = packed.meta
    op = {"embedding": "gather", "linear": "matmul", "hf_conv1d": "matmul"}.get(kind, "conv")
    what = "float32 values" if meta.bits == 32 else f"{meta.bits}-bit codes"
    sparse = f" {meta.n}:{meta.m} compressed" if meta.n else ""
    return f"decode in {op} ({what}{sparse})"


def _frozen(array: np.ndarray | None) -> nn.Parameter | None:
    return None if array is None else _parameter(array)


def _parameter(array: np.ndarray) -> nn.Parameter:
    """A stored tensor: a parameter (the Relax importer lifts those into params.bin)."""
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array)), requires_grad=False)


class _Stored(nn.Module):
    """The tensors of a `Packed` weight as frozen parameters (absent ones are None)."""

    def __init__(self, packed: Packed):
        super().__init__()
        self.meta = packed.meta.ints()
        for name, array in packed.tensors().items():
            setattr(self, name, _frozen(array))

    def stored(self) -> tuple:
        return self.codes, self.scales, self.zeros, self.table, self.index


class PackedLinear(_Stored):
    def __init__(self, packed: Packed, bias: np.ndarray | None):
        super().__init__(packed)
        self.bias = _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qspec.packed_linear(x, *self.stored(), self.bias, self.meta)


class PackedEmbedding(_Stored):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.qspec.packed_embedding(ids, *self.stored(), self.meta)


class PackedConv(_Stored):
    def __init__(self, packed: Packed, bias: np.ndarray | None, options: list[int]):
        super().__init__(packed)
        self.bias = _frozen(bias)
        self.options = options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qspec.packed_conv(x, *self.stored(), self.bias, self.meta, self.options)


def conv_options(conv: nn.Module) -> list[int] | None:
    """[stride..., padding..., dilation..., kernel...] of a groups-1, zero-padded convolution
    (None for any other)."""
    assert isinstance(conv, nn.Conv1d | nn.Conv2d)
    padding = conv.padding
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(padding, str):
        return None
    return [*conv.stride, *padding, *conv.dilation, *conv.kernel_size]


class LowRankBranch(nn.Module):
    """y = main(x) + (x Aᵀ) Bᵀ beside the compressed layer: fp16 factors as parameters cast in
    the graph, int8 ones as packed linears."""

    down: nn.Parameter | PackedLinear
    up: nn.Parameter | PackedLinear

    def __init__(self, main: nn.Module, compressed: CompressedLayer):
        super().__init__()
        assert compressed.lowrank is not None and compressed.plan.lowrank is not None
        self.main = main
        up, down = compressed.lowrank  # B [rows, r], A [r, cols]
        if compressed.plan.lowrank.factors == "fp16":
            self.down = _parameter(down.astype(np.float16))
            self.up = _parameter(up.astype(np.float16))
        else:
            self.down = PackedLinear(_int8_factor(down), None)
            self.up = PackedLinear(_int8_factor(up), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.down, nn.Parameter) and isinstance(self.up, nn.Parameter):
            return self.main(x) + F.linear(F.linear(x, self.down.float()), self.up.float())
        assert isinstance(self.down, PackedLinear) and isinstance(self.up, PackedLinear)
        return self.main(x) + self.up(self.down(x))


def _int8_factor(factor: np.ndarray) -> Packed:
    return pack_quantized(quantize(factor.astype(np.float32), FACTOR_SPEC))
