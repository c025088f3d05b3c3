"""Lowering: each CompressedLayer becomes a small torch module whose forward calls the custom
operators that export to what ONNX Runtime executes. `lower` is the table of choices.

| layer     | weight                    | activation          | emitted (kernel ORT runs)       |
|-----------|---------------------------|---------------------|---------------------------------|
| Linear    | int/uint 2/4/8, NBits blk | none                | MatMulNBits                     |
| Linear    | int/uint 8 channel/tensor | int8 token dynamic  | per-row quantize, MatMulInteger |
|           |                           |                     | (uint8 x uint8), rescale        |
| Linear    | int/uint 2/4, NBits block | int8 token dynamic  | MatMulNBits, accuracy level 4   |
| Linear    | int/uint 8 channel/tensor | int8/uint8 tensor   | DynamicQuantizeMatMul           |
|           |                           | dynamic             |                                 |
| Linear    | int/uint 8 channel/tensor | int8/uint8 tensor   | Q/DQ input, DQ weight, DQ int32 |
|           |                           | static              | bias, MatMul (MatMulIntegerTo-  |
|           |                           |                     | Float; QGemm for 2-D inputs)    |
| Conv      | int/uint 8 channel/tensor | int8/uint8 tensor   | Q/DQ input, DQ weight, DQ int32 |
|           |                           | static              | bias, Conv, Q/DQ output         |
|           |                           |                     | (QLinearConv)                   |
| Conv      | int/uint 4/8              | none                | DequantizeLinear INT4/UINT4/    |
|           |                           |                     | INT8/UINT8 + Conv               |
| Linear,   | fp8_e4m3, fp8_e5m2        | none                | DequantizeLinear FLOAT8E4M3FN/  |
| Conv      |                           |                     | FLOAT8E5M2 + MatMul/Conv        |
| Embedding | int/uint 4, NBits block   | -                   | GatherBlockQuantized            |
| any       | any other format or block | none                | packed codes decoded in-graph,  |
|           | (fp4, nf4, int3, 8-bit    |                     | then MatMul/Conv/Gather         |
|           | Embedding, ...)           |                     |                                 |

"Linear" includes Hugging Face Conv1D. Every other combination raises `unsupported`. Sparse
weights without a format are the float layer with its zeros stored. A low-rank branch (Linear
only) adds MatMul(MatMul(x, Aᵀ), Bᵀ) to the layer's output, fp16 factors or int8 ones decoded
in the graph.

NBits blocks (MatMulNBits, GatherBlockQuantized) are a power of two from 16 to 256: a group size
that is not, or channel and tensor scales, use the largest such block that divides the reduction
dimension with the scale repeated per block; when none divides it the weight is decoded. Not
DequantizeLinear: ONNX Runtime rewrites int4/int8 DequantizeLinear -> MatMul into MatMulNBits at
accuracy level 4 (unless the session sets `session.qdq_matmulnbits_accuracy_level`), which
would quantize a weight-only layer's activations behind the spec's back (measured: 8e-3 of the
output range off, against 1e-6 for the decoded weight). FLOAT8 DequantizeLinear is not fused.

Integer kernels get uint8 weights, symmetric int8 as its offset-binary codes with zero point 128
(the same numbers): on AVX2 without VNNI ONNX Runtime's u8s8 kernels add pairs of u8 x s8
products in saturating int16 (vpmaddubsw), and full-range int8 weights come out wrong (measured:
DynamicQuantizeMatMul off by 2.8 where the quantization error is 0.05, QLinearConv by up to 136
output steps); its u8u8 kernels are exact. The exception: static convolutions built on a machine
with VNNI keep signed weights, for u8s8 QLinearConv, about twice as fast
(measured on EfficientNet-Lite0), and the artifact records that it needs VNNI.

Activations are quantized to uint8 too, int8 ones with zero point z + 128 (the same grid):
with int8 activations and uint8 weights ONNX Runtime fused a MatMul only when it was the
QuantizeLinear's sole reader, so layers sharing an input (attention's q, k, v) stayed in float.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qspec.backends import lowering
from qspec.backends.lowering import sparse_float, with_lowrank
from qspec.backends.onnx import ops  # noqa: F401  (registers the custom operators)
from qspec.compiler.capture import Layer
from qspec.compiler.errors import UserError
from qspec.compiler.host import has_vnni
from qspec.compiler.numerics import Quantized, code_values, pack, quantize
from qspec.compiler.qmodel import FACTOR_SPEC, CompressedLayer

NBITS_BLOCKS = (256, 128, 64, 32, 16)
FLOAT8 = {
    "fp8_e4m3": (torch.float8_e4m3fn, "FLOAT8E4M3FN"),
    "fp8_e5m2": (torch.float8_e5m2, "FLOAT8E5M2"),
}
ACTIVATION_OFFSET = {"int8": 128, "uint8": 0}  # zero point shift to uint8, see the docstring


def lower(compressed: CompressedLayer, original: nn.Module) -> tuple[nn.Module, str]:
    """The module that replaces a compressed layer, and the name of what it emits."""
    return with_lowrank("onnx", compressed, _lower_main(compressed, original), LowRankBranch)


def unsupported(compressed: CompressedLayer, field: str, what: str, why: str) -> UserError:
    return lowering.unsupported("onnx", compressed, field, what, why)


def _lower_main(compressed: CompressedLayer, original: nn.Module) -> tuple[nn.Module, str]:
    weight = compressed.weight
    if weight is None:
        if compressed.activation is not None:
            why = "the integer kernels need int8 weights: add `weight int8 channel`"
            raise unsupported(compressed, "activation", "quantized activations alone", why)
        if compressed.mask is not None:
            return sparse_float(compressed, original), "float (sparse: zeros stored)"
        return original, "float"  # only bias correction, of a weight left as it was
    if compressed.activation is not None:
        return _lower_quantized_activations(compressed, original)
    fmt = weight.spec.format
    kind = _kind(compressed.layer)
    block = _nbits_block(compressed)
    even = compressed.layer.cols % 2 == 0
    if kind == "embedding" and fmt.is_integer and fmt.bits == 4 and block is not None and even:
        return BlockQuantizedEmbedding(compressed, block), "GatherBlockQuantized"
    if kind == "linear" and fmt.is_integer and fmt.bits in (2, 4, 8) and block is not None:
        return NBitsLinear(compressed, block, accuracy_level=0), "MatMulNBits"
    conv_int = kind == "conv" and fmt.is_integer and fmt.bits in (4, 8)
    if conv_int or (kind != "embedding" and fmt.name in FLOAT8):
        module = QDQLayer(compressed, original)
        return module, f"DequantizeLinear {module.element}+{module.onnx_op}"
    decoded = DecodedLayer(compressed, original)
    return decoded, f"decode+{decoded.onnx_op}"


class LowRankBranch(nn.Module):
    """y = main(x) + (x Aᵀ) Bᵀ: the compensation path beside the compressed layer. fp16 factors
    are fp16 initializers cast to float (ONNX Runtime folds the cast at load); int8 factors are
    int8 codes with a scale per row, decoded in the graph."""

    def __init__(self, main: nn.Module, compressed: CompressedLayer):
        super().__init__()
        assert compressed.lowrank is not None and compressed.plan.lowrank is not None
        self.main = main
        up, down = compressed.lowrank  # B [rows, r], A [r, cols]
        self.rank = down.shape[0]
        self.up = _Factor(up, compressed.plan.lowrank.factors)
        self.down = _Factor(down, compressed.plan.lowrank.factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + F.linear(F.linear(x, self.down.weight()), self.up.weight())


class _Factor(nn.Module):
    values: torch.Tensor  # fp16 factors

    def __init__(self, factor: np.ndarray, storage: str):
        super().__init__()
        self.storage = storage
        if storage == "fp16":
            self.register_buffer("values", torch.from_numpy(factor.astype(np.float16)))
            return
        quantized = quantize(factor.astype(np.float32), FACTOR_SPEC)
        self.cols = factor.shape[1]
        self.register_buffer("packed", _tensor(quantized.codes))
        self.register_buffer("scales", _tensor(quantized.scales))
        self.register_buffer("codebook", _tensor(code_values(FACTOR_SPEC.format)))

    def weight(self) -> torch.Tensor:
        if self.storage == "fp16":
            return self.values.float()
        return torch.ops.qspec.decode_weight(
            self.packed, self.scales, None, self.codebook, self.cols, 8, self.cols
        )


def _lower_quantized_activations(
    compressed: CompressedLayer, original: nn.Module
) -> tuple[nn.Module, str]:
    """Quantized activations need an integer kernel; anything without one is an error."""
    activation, weight = compressed.activation, compressed.weight
    assert activation is not None and weight is not None
    spec = weight.spec
    kind = _kind(compressed.layer)
    what = f"activations {activation.describe()} with {spec.format.name} {spec.granularity} weights"
    if activation.format not in ACTIVATION_OFFSET:
        why = "ONNX Runtime has no fp8 matmul or convolution kernel here: use int8 activations"
        raise unsupported(compressed, "activation", f"{activation.format} activations", why)
    eight_bit = spec.format.is_integer and spec.format.bits == 8 and spec.granularity != "group"
    if activation.granularity == "token":
        level4 = activation.format == "int8" and activation.dynamic and activation.symmetric
        if level4 and eight_bit and kind == "linear":
            return RowQuantizedLinear(compressed), "MatMulInteger (per-token int8)"
        nbits = kind == "linear" and spec.format.is_integer and spec.format.bits in (2, 4, 8)
        block = _nbits_block(compressed)
        if level4 and nbits and block is not None:
            return NBitsLinear(compressed, block, accuracy_level=4), "MatMulNBits"
        why = (
            "per-token activations run as int8 symmetric dynamic, in MatMulNBits only: Linear "
            "layers with int/uint 2/4/8 weights in blocks of 16 to 256"
        )
        raise unsupported(compressed, "activation", what, why)
    if not (spec.format.is_integer and spec.format.bits == 8 and spec.granularity != "group"):
        why = "the integer kernels take int8 or uint8 weights per channel or per tensor"
        raise unsupported(compressed, "activation", what, why)
    if activation.dynamic and kind == "linear":
        return DynamicQuantizeLinear(compressed), "DynamicQuantizeMatMul"
    if activation.dynamic:
        why = "ONNX Runtime has no dynamically quantized Conv: use activation int8 tensor static"
        raise unsupported(compressed, "activation", "dynamic activations", why)
    module = QDQLayer(compressed, original)
    fused = "MatMulIntegerToFloat/QGemm" if kind == "linear" else "QLinearConv"
    return module, f"QDQ {module.onnx_op} ({fused})"


def _kind(layer: Layer) -> str:
    if layer.kind.startswith("conv"):
        return "conv"
    return "embedding" if layer.kind == "embedding" else "linear"


def _nbits_block(compressed: CompressedLayer) -> int | None:
    """The MatMulNBits / GatherBlockQuantized block for this weight, if one fits."""
    weight = compressed.weight
    assert weight is not None
    cols = compressed.layer.cols
    block = weight.spec.block_size(cols)
    if weight.spec.granularity == "group":
        return block if block in NBITS_BLOCKS else None
    return next((b for b in NBITS_BLOCKS if cols % b == 0), None)


def _reblock(weight: Quantized, block: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales and zero points per `block` columns: channel and tensor ones repeated."""
    cols = weight.codes.shape[1]
    spec_block = weight.spec.block_size(cols)
    repeat = spec_block // block if weight.spec.granularity != "group" else 1
    blocks = -(-cols // block)
    scales = np.repeat(weight.scales, repeat, axis=1)[:, :blocks]
    zeros = weight.zero_points
    if zeros is not None:
        zeros = np.ascontiguousarray(np.repeat(zeros, repeat, axis=1)[:, :blocks])
    return np.ascontiguousarray(scales), zeros


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.ascontiguousarray(array))


class NBitsLinear(nn.Module):
    """y = x W^T + b with W in MatMulNBits storage: [n, blocks, block*bits/8] packed codes.
    Accuracy level 0 computes in float; level 4 quantizes x to int8 per row and block."""

    def __init__(self, compressed: CompressedLayer, block: int, accuracy_level: int):
        super().__init__()
        weight = compressed.weight
        assert weight is not None
        rows, cols = weight.codes.shape
        bits = weight.spec.format.bits
        blocks = -(-cols // block)
        codes = np.zeros((rows, blocks * block), np.uint8)
        codes[:, :cols] = weight.codes
        self.register_buffer(
            "packed", torch.from_numpy(pack(codes, bits).reshape(rows, blocks, -1))
        )
        scales, zeros = _reblock(weight, block)
        self.register_buffer("scales", _tensor(scales))
        self.register_buffer("zero_points", None if zeros is None else _tensor(pack(zeros, bits)))
        self.register_buffer("bias", _tensor(compressed.bias))
        self.n, self.k, self.bits, self.block = rows, cols, bits, block
        self.accuracy_level = accuracy_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qspec.matmul_nbits(
            x,
            self.packed,
            self.scales,
            self.zero_points,
            self.n,
            self.k,
            self.bits,
            self.block,
            self.accuracy_level,
        )
        return y if self.bias is None else y + self.bias


class DequantizedWeight:
    """A weight as DequantizeLinear reads it, in the layout its consumer takes: [K, N] for MatMul
    (blocks along axis 0, channel scales along axis 1), the Conv weight [O, I/groups, *kernel]
    (blocks along axis 1 = input channels, channel scales along axis 0).

    Codes are signed (INT4/INT8, symmetric formats, no zero point) or unsigned with zero points
    (asymmetric formats, and every integer weight when `unsigned`: symmetric ones with zero
    point 2^(b-1)), or FLOAT8. 4-bit codes are held one per int8/uint8 element; `narrow` names
    the ml_dtypes type the exporter stores them as."""

    def __init__(self, compressed: CompressedLayer, unsigned: bool):
        weight = compressed.weight
        assert weight is not None
        spec, fmt, layer = weight.spec, weight.spec.format, compressed.layer
        self.conv = layer.kind.startswith("conv")
        bits = fmt.bits
        zeros = weight.zero_points
        if fmt.is_float:
            dtype, self.element = FLOAT8[fmt.name]
            codes = torch.from_numpy(self._layout(layer, weight.codes)).view(dtype)
        elif zeros is None and not unsigned:  # offset binary -> two's complement
            signed = weight.codes.astype(np.int16) - (1 << (bits - 1))
            codes = torch.from_numpy(self._layout(layer, signed.astype(np.int8)))
            self.element = f"INT{bits}"
        else:
            if zeros is None:
                zeros = np.full(weight.scales.shape, 1 << (bits - 1), np.uint8)
            codes = torch.from_numpy(self._layout(layer, weight.codes))
            self.element = f"UINT{bits}"
        self.codes = codes
        self.narrow = {}
        if bits == 4:
            self.narrow["codes"] = ml_dtypes.int4 if self.element == "INT4" else ml_dtypes.uint4
            if zeros is not None:
                self.narrow["zero_point"] = ml_dtypes.uint4
        if spec.granularity == "tensor":
            self.axis, self.block = 0, 0
            self.scale, self.zero_point = weight.scales[0, 0], _first(zeros, 0)
        elif spec.granularity == "channel":
            self.axis, self.block = (0 if self.conv else 1), 0
            self.scale, self.zero_point = weight.scales[:, 0], _first(zeros, slice(None))
        else:
            self.axis, self.block = (1 if self.conv else 0), spec.block_size(layer.cols)
            self.scale = self._layout(layer, weight.scales)
            self.zero_point = None if zeros is None else self._layout(layer, zeros)

    @staticmethod
    def _layout(layer: Layer, matrix: np.ndarray) -> np.ndarray:
        """[rows, cols] (or per-block [rows, blocks]) -> the consumer's layout."""
        if layer.kind.startswith("conv"):
            out, _, *kernel = layer.weight_shape
            return np.ascontiguousarray(np.moveaxis(matrix.reshape(out, *kernel, -1), -1, 1))
        return np.ascontiguousarray(matrix.T)

    def register(self, module: nn.Module) -> None:
        """Buffers `codes`, `scale`, `zero_point` on the module."""
        module.register_buffer("codes", self.codes)
        module.register_buffer("scale", _tensor(np.asarray(self.scale, np.float32)))
        module.register_buffer("zero_point", _tensor(self.zero_point))


def _first(zeros: np.ndarray | None, index: int | slice) -> np.ndarray | None:
    return None if zeros is None else np.asarray(zeros[:, 0][index])


class QDQLayer(nn.Module):
    """DequantizeLinear weights feeding the layer's own MatMul or Conv. With static activations
    the input is quantized and dequantized (QuantizeLinear/DequantizeLinear) with the calibrated
    scale, the bias becomes int32 at scale input x weight scale, and a Conv gets Q/DQ on its
    output: the patterns ONNX Runtime fuses into MatMulIntegerToFloat (QGemm when the input is
    2-D: its MatMul+Add fusion runs first, and takes only an int32 bias to an integer Gemm) and
    QLinearConv."""

    def __init__(self, compressed: CompressedLayer, original: nn.Module):
        super().__init__()
        static = compressed.activation is not None
        # u8 x s8 QLinearConv (twice as fast) only where it is exact: a build machine with VNNI;
        # the artifact then says so (needs_vnni). ONNX Runtime's Gemm fusions want u8 weights.
        signed = compressed.layer.kind.startswith("conv") and has_vnni()
        weight = DequantizedWeight(compressed, unsigned=static and not signed)
        weight.register(self)
        self.narrow, self.element = weight.narrow, weight.element
        self.axis, self.block, self.conv = weight.axis, weight.block, weight.conv
        self.layer = compressed.layer
        self.onnx_op = "Conv" if self.conv else "MatMul"
        self.options = _conv_options(original) if self.conv else {}
        self._activation_buffers(compressed, "input", static)
        self._activation_buffers(compressed, "output", static and self.conv)
        bias, bias_codes, bias_scale = compressed.bias, None, None
        if bias is not None and static:  # the integer kernels add an int32 bias
            bias_scale = np.float32(compressed.activation_scale) * np.asarray(weight.scale)
            bias_codes = np.clip(np.rint(bias / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
            bias = None
        self.register_buffer("bias", _tensor(bias))
        self.register_buffer("bias_codes", _tensor(bias_codes))
        self.register_buffer("bias_scale", _tensor(bias_scale))

    def _activation_buffers(self, compressed: CompressedLayer, where: str, active: bool) -> None:
        scale = zero = None
        if active:
            activation = compressed.activation
            assert activation is not None
            prefix = "activation" if where == "input" else "output"
            value = getattr(compressed, f"{prefix}_scale")
            assert value is not None, f"no calibrated {where} scale for {compressed.layer.name}"
            scale = torch.tensor(value, dtype=torch.float32)
            zero_point = getattr(compressed, f"{prefix}_zero_point")
            zero = torch.tensor(
                zero_point + ACTIVATION_OFFSET[activation.format], dtype=torch.uint8
            )
        self.register_buffer(f"{where}_scale", scale)
        self.register_buffer(f"{where}_zero_point", zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = torch.ops.qspec.fake_quantize(x, self.input_scale, self.input_zero_point)
        weight = torch.ops.qspec.dequantize(
            self.codes, self.scale, self.zero_point, self.axis, self.block
        )
        bias = self.bias
        if self.bias_codes is not None:
            bias = torch.ops.qspec.dequantize(self.bias_codes, self.bias_scale, None, 0, 0)
        if not self.conv:
            return x @ weight if bias is None else x @ weight + bias
        y = _convolve(self.layer, weight, x, bias, self.options)
        if self.output_scale is not None:
            y = torch.ops.qspec.fake_quantize(y, self.output_scale, self.output_zero_point)
        return y


class DynamicQuantizeLinear(nn.Module):
    """y = x W^T + b as com.microsoft DynamicQuantizeMatMul: W [K, N] uint8 with zero points
    and a scale per column (or tensor); ONNX Runtime quantizes x to uint8 per tensor per call."""

    def __init__(self, compressed: CompressedLayer):
        super().__init__()
        weight = DequantizedWeight(compressed, unsigned=True)
        weight.register(self)
        self.register_buffer("bias", _tensor(compressed.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qspec.dynamic_quantize_matmul(
            x, self.codes, self.scale, self.zero_point, self.bias
        )


class RowQuantizedLinear(nn.Module):
    """y = x W^T + b with x quantized per row (token) at run time: elementwise ops around one
    uint8 x uint8 MatMulInteger, W [K, N] uint8 with zero points and scales per column."""

    def __init__(self, compressed: CompressedLayer):
        super().__init__()
        DequantizedWeight(compressed, unsigned=True).register(self)
        self.register_buffer("bias", _tensor(compressed.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qspec.matmul_integer_rows(
            x, self.codes, self.scale, self.zero_point, self.bias
        )


class BlockQuantizedEmbedding(nn.Module):
    """An embedding table in com.microsoft GatherBlockQuantized storage: [rows, cols/2] bytes of
    two 4-bit codes, scales per block along the row, zero points packed (default 8 = int4)."""

    def __init__(self, compressed: CompressedLayer, block: int):
        super().__init__()
        weight = compressed.weight
        assert weight is not None
        scales, zeros = _reblock(weight, block)
        self.register_buffer("packed", _tensor(pack(weight.codes, 4)))
        self.register_buffer("scales", _tensor(scales))
        self.register_buffer("zero_points", None if zeros is None else _tensor(pack(zeros, 4)))
        self.block = block

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.qspec.gather_block_quantized(
            self.packed, indices, self.scales, self.zero_points, self.block
        )


class DecodedLayer(nn.Module):
    """Any weight format: packed codes decoded in the graph, then the layer's own float op."""

    bias: torch.Tensor | None

    def __init__(self, compressed: CompressedLayer, original: nn.Module):
        super().__init__()
        weight = compressed.weight
        assert weight is not None
        layer = compressed.layer
        rows, cols = weight.codes.shape
        fmt = weight.spec.format
        block = weight.spec.block_size(cols)
        blocks = weight.scales.shape[1]
        codes = np.zeros((rows, blocks * block), np.uint8)
        codes[:, :cols] = weight.codes
        self.register_buffer("packed", torch.from_numpy(pack(codes, fmt.bits)))
        self.register_buffer("scales", _tensor(weight.scales))
        zero_points = weight.zero_points
        self.register_buffer("zero_points", _tensor(zero_points))
        codebook = (
            code_values(fmt) if zero_points is None else np.arange(1 << fmt.bits, dtype=np.float32)
        )
        self.register_buffer(
            "codebook", torch.from_numpy(np.nan_to_num(codebook).astype(np.float32))
        )
        self.register_buffer("bias", _tensor(compressed.bias))
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
        out, inp, *kernel = self.layer.weight_shape
        weight = matrix.reshape(out, *kernel, inp).movedim(-1, 1)
        return _convolve(self.layer, weight, x, self.bias, self.conv)


def _conv_options(conv: nn.Module) -> dict:
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise UserError(f"cannot lower a Conv with padding mode {conv.padding_mode}")
    return {k: getattr(conv, k) for k in ("stride", "padding", "dilation", "groups")}


def _convolve(layer: Layer, weight: torch.Tensor, x: torch.Tensor, bias, options: dict):
    convolve = F.conv1d if layer.kind == "conv1d" else F.conv2d
    return convolve(x, weight, bias, **options)
