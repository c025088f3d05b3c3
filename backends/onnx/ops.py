"""Torch custom operators for compressed layers, and their ONNX translations.

Each operator has a torch reference implementation that computes exactly what the ONNX
operators it translates to compute, so a lowered module can be run in torch (per-layer error,
tests) and exported with `torch.onnx.export(dynamo=True, custom_translation_table=TABLE)`.

No `from __future__ import annotations` here: torch.library reads the annotations.
"""

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


def matmul_nbits_onnx(x, packed, scales, zero_points, n: int, k: int, bits: int, block: int,
                      accuracy_level: int):  # fmt: skip
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


TABLE = {
    torch.ops.qspec.matmul_nbits.default: matmul_nbits_onnx,
    torch.ops.qspec.decode_weight.default: decode_weight_onnx,
}
