"""Torch custom operators for compressed layers, and their ONNX translations.

Each operator has a torch reference implementation that computes exactly what the ONNX
operators it translates to compute, so a lowered module can be run in torch (per-layer error,
tests) and exported with `torch.onnx.export(dynamo=True, custom_translation_table=TABLE)`.

No `from __future__ import annotations` here: torch.library reads the annotations.
"""

from collections.abc import Callable
from typing import Any

import onnx
import torch
from onnxscript import opset21 as op
from onnxscript.values import Opset

from qspec.backends.onnx import schemas

schemas.register()
MS = Opset(schemas.DOMAIN, 1)
Tensor = torch.Tensor


# ---- reference helpers (torch) ---------------------------------------------------------------


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Codes along the last axis from bytes: low bits first; 3-bit in 3-byte words of 8 codes."""
    packed = packed.to(torch.int32)
    if bits == 8:
        return packed
    if bits == 3:
        words = packed.reshape(*packed.shape[:-1], -1, 3)
        word = words[..., 0] | (words[..., 1] << 8) | (words[..., 2] << 16)
        codes = [(word >> (3 * k)) & 7 for k in range(8)]
        return torch.stack(codes, -1).reshape(*packed.shape[:-1], -1)
    per_byte = 8 // bits
    codes = [(packed >> (bits * k)) & ((1 << bits) - 1) for k in range(per_byte)]
    return torch.stack(codes, -1).reshape(*packed.shape[:-1], -1)


def expand_blocks(per_block: Tensor, block: int, cols: int) -> Tensor:
    """[rows, n_blocks] -> [rows, cols]: each block's value repeated over its columns."""
    return per_block.repeat_interleave(block, dim=-1)[..., :cols]


# ---- MatMulNBits -------------------------------------------------------------------------------


@torch.library.custom_op("qspec::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zero_points: Tensor | None,
    n: int,
    k: int,
    bits: int,
    block: int,
    accuracy_level: int,
) -> Tensor:
    """y = x @ W.T with W [n, k] stored as MatMulNBits does: packed [n, blocks, block*bits/8],
    scales [n, blocks], zero points packed along blocks (default 2^(bits-1)). Accuracy level 4
    quantizes x to int8 per row and block, as ONNX Runtime's int8 kernel does."""
    blocks = scales.shape[1]
    codes = unpack_codes(packed.reshape(n, -1), bits)[:, :k].float()
    if zero_points is None:
        zero = torch.full_like(scales, float(1 << (bits - 1)))
    else:
        zero = unpack_codes(zero_points, bits)[:, :blocks].float()
    weight = (codes - expand_blocks(zero, block, k)) * expand_blocks(scales, block, k)
    if accuracy_level == 4:
        x = _int8_rows(x, block)
    return x @ weight.T


def _int8_rows(x: Tensor, block: int) -> Tensor:
    """Symmetric int8 fake quantization of x per row and per block of the reduction axis."""
    k = x.shape[-1]
    pad = (-k) % block
    padded = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)
    scale = padded.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    quantized = torch.round(padded / scale).clamp(-127, 127) * scale
    return quantized.reshape(*x.shape[:-1], -1)[..., :k]


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, n, k, bits, block, accuracy_level):
    return x.new_empty(*x.shape[:-1], n)


def matmul_nbits_onnx(
    x, packed, scales, zero_points, n: int, k: int, bits: int, block: int, accuracy_level: int
):
    return MS.MatMulNBits(
        x,
        packed,
        scales,
        zero_points,
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )


# ---- codebook decode (formats ONNX Runtime has no kernel for) ---------------------------------


@torch.library.custom_op("qspec::decode_weight", mutates_args=())
def decode_weight(
    packed: Tensor,
    scales: Tensor,
    zero_points: Tensor | None,
    codebook: Tensor,
    cols: int,
    bits: int,
    block: int,
) -> Tensor:
    """W [rows, cols] = (codebook[code] - zero point) * scale, codes packed along each row.
    Translated to bit operations, a Gather into the codebook and a blockwise Mul, so the file
    keeps the packed codes (ONNX Runtime folds it to a float weight when the session loads)."""
    codes = unpack_codes(packed, bits)[:, :cols].long()
    values = codebook[codes]
    if zero_points is not None:
        values = values - expand_blocks(zero_points.float(), block, cols)
    return values * expand_blocks(scales, block, cols)


@decode_weight.register_fake
def _(packed, scales, zero_points, codebook, cols, bits, block):
    return scales.new_empty(packed.shape[0], cols)


def decode_weight_onnx(packed, scales, zero_points, codebook, cols: int, bits: int, block: int):
    rows = packed.shape[0]
    nbytes = packed.shape[1]
    if bits == 8:
        codes = packed
    elif bits == 3:
        words = op.Cast(op.Reshape(packed, op.Constant(value_ints=[rows, nbytes // 3, 3])), to=12)
        b0, b1, b2 = op.Split(words, axis=2, num_outputs=3)
        eight = op.Constant(value_ints=[8])
        sixteen = op.Constant(value_ints=[16])
        word = op.BitwiseOr(
            op.BitwiseOr(b0, op.BitShift(b1, op.Cast(eight, to=12), direction="LEFT")),
            op.BitShift(b2, op.Cast(sixteen, to=12), direction="LEFT"),
        )
        codes = _split_fields(word, 3, 8, 12, [rows, nbytes // 3 * 8])
    else:
        codes = _split_fields(packed, bits, 8 // bits, 2, [rows, nbytes * 8 // bits])
    blocks = scales.shape[1]
    index = op.Cast(
        op.Slice(
            codes,
            op.Constant(value_ints=[0]),
            op.Constant(value_ints=[blocks * block]),
            op.Constant(value_ints=[1]),
        ),
        to=7,
    )
    values = op.Gather(codebook, index)
    values = op.Reshape(values, op.Constant(value_ints=[rows, blocks, block]))
    if zero_points is not None:
        values = op.Sub(
            values, op.Unsqueeze(op.Cast(zero_points, to=1), op.Constant(value_ints=[2]))
        )
    weight = op.Mul(values, op.Unsqueeze(scales, op.Constant(value_ints=[2])))
    weight = op.Reshape(weight, op.Constant(value_ints=[rows, blocks * block]))
    return op.Slice(
        weight,
        op.Constant(value_ints=[0]),
        op.Constant(value_ints=[cols]),
        op.Constant(value_ints=[1]),
    )


def _split_fields(word, bits: int, count: int, onnx_type: int, shape: list[int]):
    """Codes of `bits` bits at shifts 0, bits, 2*bits... of each word, interleaved in order."""
    mask = op.Cast(op.Constant(value_ints=[(1 << bits) - 1]), to=onnx_type)
    fields = []
    for k in range(count):
        shift = op.Cast(op.Constant(value_ints=[bits * k]), to=onnx_type)
        shifted = op.BitShift(word, shift, direction="RIGHT") if k else word
        fields.append(op.Unsqueeze(op.BitwiseAnd(shifted, mask), op.Constant(value_ints=[-1])))
    return op.Reshape(op.Concat(*fields, axis=-1), op.Constant(value_ints=shape))


# ---- standard quantization operators (DequantizeLinear, QuantizeLinear) -------------------------


@torch.library.custom_op("qspec::dequantize", mutates_args=())
def dequantize(
    codes: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int, block: int
) -> Tensor:
    """DequantizeLinear: (codes - zero point) * scale in float32, the scale (and zero point)
    scalar, per `axis` (block 0) or per `block` elements along `axis` (opset 21 blocking).
    4-bit codes are held one per int8/uint8 here and stored as INT4/UINT4 by the exporter."""
    return _dequantize(codes, scale, zero_point, axis, block)


def _dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int, block: int):
    values = codes.float()
    if zero_point is not None:
        values = values - _along(zero_point.float(), codes.shape, axis, block)
    return values * _along(scale, codes.shape, axis, block)


def _along(values: Tensor, shape: torch.Size, axis: int, block: int) -> Tensor:
    """Scale or zero point broadcast to the data's shape, as DequantizeLinear reads it."""
    if values.dim() == 0:
        return values
    if block == 0:
        view = [1] * len(shape)
        view[axis] = -1
        return values.reshape(view)
    return values.repeat_interleave(block, dim=axis).narrow(axis, 0, shape[axis])


@dequantize.register_fake
def _(codes, scale, zero_point, axis, block):
    return scale.new_empty(codes.shape)


def dequantize_onnx(codes, scale, zero_point, axis: int, block: int):
    return op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block)


@torch.library.custom_op("qspec::fake_quantize", mutates_args=())
def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """QuantizeLinear then DequantizeLinear with a per-tensor scale and an int8 or uint8 zero
    point (its dtype sets the range): ONNX Runtime turns the pair into integer kernel inputs."""
    info = torch.iinfo(zero_point.dtype)
    return _fake_quantize(x, scale, zero_point.float(), info.min, info.max)


def _fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, low: int, high: int) -> Tensor:
    """Round half to even (torch.round), as QuantizeLinear does, then saturate."""
    return (torch.clamp(torch.round(x / scale) + zero, low, high) - zero) * scale


@fake_quantize.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


def fake_quantize_onnx(x, scale, zero_point):
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


# ---- DynamicQuantizeMatMul ---------------------------------------------------------------------


@torch.library.custom_op("qspec::dynamic_quantize_matmul", mutates_args=())
def dynamic_quantize_matmul(
    x: Tensor, b: Tensor, b_scale: Tensor, b_zero_point: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = x' @ B + bias with B [K, N] = (b - zero point) * scale per column (or tensor) and x'
    x quantized as ONNX Runtime's DynamicQuantizeLinear does, whatever the spec's activation
    format: uint8 with a zero point, range [min(x, 0), max(x, 0)] of the whole tensor."""
    low, high = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    scale = torch.where(high > low, (high - low) / 255, torch.ones_like(high))
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    y = _fake_quantize(x, scale, zero, 0, 255) @ _dequantize(b, b_scale, b_zero_point, 1, 0)
    return y if bias is None else y + bias


@dynamic_quantize_matmul.register_fake
def _(x, b, b_scale, b_zero_point, bias):
    return x.new_empty(*x.shape[:-1], b.shape[1])


def dynamic_quantize_matmul_onnx(x, b, b_scale, b_zero_point, bias):
    return MS.DynamicQuantizeMatMul(x, b, b_scale, b_zero_point, bias)


# ---- per-token dynamic int8: MatMulInteger ------------------------------------------------------


@torch.library.custom_op("qspec::matmul_integer_rows", mutates_args=())
def matmul_integer_rows(
    x: Tensor, b: Tensor, b_scale: Tensor, b_zero_point: Tensor, bias: Tensor | None
) -> Tensor:
    """y = x' @ B + bias, x' = x quantized per row (per token): scale absmax/127, codes
    round(x / scale) + 128 in uint8 (zero point 128, a symmetric grid), B [K, N] uint8 with zero
    points and scales per column (or tensor). In ONNX: one MatMulInteger (uint8 x uint8, exact
    on every CPU) between elementwise quantize and rescale."""
    scale = x.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    x_q = _fake_quantize(x, scale, torch.full_like(scale, 128.0), 0, 255)
    y = x_q @ _dequantize(b, b_scale, b_zero_point, 1, 0)
    return y if bias is None else y + bias


@matmul_integer_rows.register_fake
def _(x, b, b_scale, b_zero_point, bias):
    return x.new_empty(*x.shape[:-1], b.shape[1])


def matmul_integer_rows_onnx(x, b, b_scale, b_zero_point, bias):
    zero = op.Constant(value_float=0.0)
    peak = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    scale = op.Div(peak, op.Constant(value_float=127.0))
    scale = op.Where(op.Greater(scale, zero), scale, op.Constant(value_float=1.0))
    codes = op.Add(op.Round(op.Div(x, scale)), op.Constant(value_float=128.0))
    codes = op.Cast(op.Clip(codes, zero, op.Constant(value_float=255.0)), to=2)
    a_zero = op.Constant(value=onnx.helper.make_tensor("a_zero", onnx.TensorProto.UINT8, [], [128]))
    y = op.Cast(op.MatMulInteger(codes, b, a_zero, b_zero_point), to=1)
    y = op.Mul(op.Mul(y, scale), b_scale)
    return y if bias is None else op.Add(y, bias)


# ---- GatherBlockQuantized ----------------------------------------------------------------------


@torch.library.custom_op("qspec::gather_block_quantized", mutates_args=())
def gather_block_quantized(
    data: Tensor, indices: Tensor, scales: Tensor, zero_points: Tensor | None, block: int
) -> Tensor:
    """Rows of a 4-bit table: data [rows, cols/2] two codes per byte (low nibble first), scales
    [rows, blocks] along the row, zero points packed like data (default 8)."""
    cols = data.shape[1] * 2
    codes = unpack_codes(data[indices], 4).float()
    scale = scales[indices]
    if zero_points is None:
        zero = torch.full_like(scale, 8.0)
    else:
        zero = unpack_codes(zero_points[indices], 4)[..., : scales.shape[1]].float()
    return (codes - expand_blocks(zero, block, cols)) * expand_blocks(scale, block, cols)


@gather_block_quantized.register_fake
def _(data, indices, scales, zero_points, block):
    return scales.new_empty(*indices.shape, data.shape[1] * 2)


def gather_block_quantized_onnx(data, indices, scales, zero_points, block: int):
    return MS.GatherBlockQuantized(
        data,
        indices,
        scales,
        zero_points,
        bits=4,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )


# ---- layer slots (emitting by pieces, see pieces.py) -------------------------------------------

SLOT_DOMAIN = schemas.SLOT_DOMAIN
SLOT = Opset(SLOT_DOMAIN, 1)
# layer -> its output for an input, on the fake tensors of an export (set by pieces.slots_for)
slot_outputs: dict[str, Callable[[Tensor], Tensor]] = {}


@torch.library.custom_op("qspec::layer_slot", mutates_args=())
def layer_slot(x: Tensor, layer: str) -> Tensor:
    """Where a compressed layer's piece will go: exported, never run."""
    raise RuntimeError(f"the slot of {layer} is exported, never run")


@layer_slot.register_fake
def _(x, layer):
    return slot_outputs[layer](x)


def layer_slot_onnx(x, layer: str):
    return SLOT.Layer(x, layer=layer)


TABLE: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.qspec.layer_slot.default: layer_slot_onnx,
    torch.ops.qspec.matmul_nbits.default: matmul_nbits_onnx,
    torch.ops.qspec.decode_weight.default: decode_weight_onnx,
    torch.ops.qspec.dequantize.default: dequantize_onnx,
    torch.ops.qspec.fake_quantize.default: fake_quantize_onnx,
    torch.ops.qspec.dynamic_quantize_matmul.default: dynamic_quantize_matmul_onnx,
    torch.ops.qspec.matmul_integer_rows.default: matmul_integer_rows_onnx,
    torch.ops.qspec.gather_block_quantized.default: gather_block_quantized_onnx,
}
