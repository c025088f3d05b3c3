"""Lowering: each CompressedLayer becomes a small torch module whose forward calls the custom
operator that exports to what ONNX Runtime executes. `lower` is the table of choices.

| layer                | weight                               | emitted                          |
|----------------------|--------------------------------------|----------------------------------|
| Linear, HF Conv1D    | int/uint 2/4/8 bits                  | com.microsoft MatMulNBits        |
| Linear, Conv, Embed. | any other format (fp4, nf4, int3...) | packed codes decoded in-graph    |

MatMulNBits blocks must be a power of two from 16 to 256: a group size that is not, or channel
and tensor scales, use the largest such block that divides the reduction dimension with the
scale repeated per block; when none divides it the decode path is used.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qspec.backends.onnx import ops  # noqa: F401  (registers the custom operators)
from qspec.compiler.capture import Layer
from qspec.compiler.errors import UserError
from qspec.compiler.numerics import code_values, pack
from qspec.compiler.qmodel import CompressedLayer

NBITS_BLOCKS = (256, 128, 64, 32, 16)


def unsupported(compressed: CompressedLayer, field: str, what: str) -> UserError:
    """The error for a setting this backend cannot run, pointing at the rule that set it."""
    return UserError(
        f"target onnx cannot run {what} on {compressed.layer.name} ({compressed.layer.kind})",
        compressed.plan.sources.get(field) or compressed.plan.sources.get("weight"),
    )


def lower(compressed: CompressedLayer, original: nn.Module) -> tuple[nn.Module, str]:
    """The module that replaces a compressed layer, and the name of what it emits."""
    layer, weight = compressed.layer, compressed.weight
    if weight is None:
        raise unsupported(
            compressed, "activation", "activation-only quantization (no weight format)"
        )
    fmt = weight.spec.format
    if layer.kind in ("linear", "hf_conv1d") and fmt.is_integer and fmt.bits in (2, 4, 8):
        block = _nbits_block(compressed)
        if block is not None:
            return NBitsLinear(compressed, block), "MatMulNBits"
    decoded = DecodedLayer(compressed, original)
    return decoded, f"decode+{decoded.onnx_op}"


def _nbits_block(compressed: CompressedLayer) -> int | None:
    weight = compressed.weight
    assert weight is not None
    cols = compressed.layer.cols
    block = weight.spec.block_size(cols)
    if weight.spec.granularity == "group":
        return block if block in NBITS_BLOCKS else None
    return next((b for b in NBITS_BLOCKS if cols % b == 0), None)


def _accuracy_level(compressed: CompressedLayer) -> int:
    """0 (float compute) for weight-only layers; 4 (int8 activations per row) for int8 token
    dynamic activations, which is what ONNX Runtime's level 4 does."""
    activation = compressed.activation
    if activation is None:
        return 0
    if (activation.format, activation.granularity, activation.dynamic) == ("int8", "token", True):
        return 4
    raise unsupported(
        compressed, "activation", f"activations {activation.describe()} with this weight"
    )


class NBitsLinear(nn.Module):
    """y = x W^T + b with W in MatMulNBits storage: [n, blocks, block*bits/8] packed codes."""

    def __init__(self, compressed: CompressedLayer, block: int):
        super().__init__()
        weight = compressed.weight
        assert weight is not None
        rows, cols = weight.codes.shape
        bits = weight.spec.format.bits
        spec_block = weight.spec.block_size(cols)
        repeat = spec_block // block if weight.spec.granularity != "group" else 1
        blocks = -(-cols // block)
        codes = np.zeros((rows, blocks * block), np.uint8)
        codes[:, :cols] = weight.codes
        self.register_buffer(
            "packed", torch.from_numpy(pack(codes, bits).reshape(rows, blocks, -1))
        )
        scales = np.repeat(weight.scales, repeat, axis=1)[:, :blocks]
        self.register_buffer("scales", torch.from_numpy(np.ascontiguousarray(scales)))
        zero_points = None
        if weight.zero_points is not None:
            zeros = np.repeat(weight.zero_points, repeat, axis=1)[:, :blocks]
            zero_points = torch.from_numpy(pack(np.ascontiguousarray(zeros), bits))
        self.register_buffer("zero_points", zero_points)
        bias = compressed.bias
        self.register_buffer("bias", None if bias is None else torch.from_numpy(bias))
        self.n, self.k, self.bits, self.block = rows, cols, bits, block
        self.accuracy_level = _accuracy_level(compressed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qspec.matmul_nbits(
            x, self.packed, self.scales, self.zero_points, self.n, self.k, self.bits, self.block,
            self.accuracy_level,
        )  # fmt: skip
        return y if self.bias is None else y + self.bias


class DecodedLayer(nn.Module):
    """Any weight format: packed codes decoded in the graph, then the layer's own float op."""

    def __init__(self, compressed: CompressedLayer, original: nn.Module):
        super().__init__()
        weight = compressed.weight
        assert weight is not None
        if compressed.activation is not None:
            raise unsupported(
                compressed, "activation", f"activations with {weight.spec.format.name}"
            )
        layer = compressed.layer
        rows, cols = weight.codes.shape
        fmt = weight.spec.format
        block = weight.spec.block_size(cols)
        blocks = weight.scales.shape[1]
        codes = np.zeros((rows, blocks * block), np.uint8)
        codes[:, :cols] = weight.codes
        self.register_buffer("packed", torch.from_numpy(pack(codes, fmt.bits)))
        self.register_buffer("scales", torch.from_numpy(np.ascontiguousarray(weight.scales)))
        zero_points = weight.zero_points
        self.register_buffer(
            "zero_points", None if zero_points is None else torch.from_numpy(zero_points)
        )
        codebook = (
            code_values(fmt) if zero_points is None else np.arange(1 << fmt.bits, dtype=np.float32)
        )
        self.register_buffer(
            "codebook", torch.from_numpy(np.nan_to_num(codebook).astype(np.float32))
        )
        bias = compressed.bias
        self.register_buffer("bias", None if bias is None else torch.from_numpy(bias))
        self.layer, self.cols, self.bits, self.block = layer, cols, fmt.bits, block
        self.conv = _conv_options(original) if layer.kind.startswith("conv") else {}
        self.onnx_op = {"embedding": "Gather", "linear": "MatMul", "hf_conv1d": "MatMul"}.get(
            layer.kind, "Conv"
        )

    def weight(self) -> torch.Tensor:
        return torch.ops.qspec.decode_weight(
            self.packed,
            self.scales,
            self.zero_points,
            self.codebook,
            self.cols,
            self.bits,
            self.block,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matrix = self.weight()
        kind = self.layer.kind
        if kind == "embedding":
            return F.embedding(x, matrix)
        if kind in ("linear", "hf_conv1d"):
            return F.linear(x, matrix, self.bias)
        return _convolve(self.layer, matrix, x, self.bias, self.conv)


def _conv_options(conv: nn.Module) -> dict:
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise UserError(f"cannot lower a Conv with padding mode {conv.padding_mode}")
    return {k: getattr(conv, k) for k in ("stride", "padding", "dilation", "groups")}


def _convolve(layer: Layer, matrix: torch.Tensor, x: torch.Tensor, bias, options: dict):
    out, inp, *kernel = layer.weight_shape
    weight = matrix.reshape(out, *kernel, inp).movedim(-1, 1)
    convolve = F.conv1d if layer.kind == "conv1d" else F.conv2d
    return convolve(x, weight, bias, **options)
