"""The one decode of a stored weight element, W[row, col] from the tensors of `layout.Packed`.

It is written once against a small set of primitives (`Ops`) and run two ways: on TE
expressions, where it becomes the decode stage inside the TVM kernels, and on torch index
tensors, where it is the reference the exported graph's custom ops compute. So the artifact and
its reference cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Protocol

from qspec.backends.tvm.layout import OFFSET, TABLE, VALUE, ZERO, Meta

WORD = 0xFFFFFFFF


class Ops(Protocol):
    def word(self, value: Any) -> Any: ...  # an int32 word as a non-negative int64
    def int64(self, value: Any) -> Any: ...
    def float32(self, value: Any) -> Any: ...
    def bits_to_float32(self, value: Any) -> Any: ...  # reinterpret int32 bits
    def where(self, condition: Any, a: Any, b: Any) -> Any: ...
    def equal(self, a: Any, b: Any) -> Any: ...


def code_at(ops: Ops, stream: Any, bits: int, element: Any) -> Any:
    """The `element`-th b-bit code of a bitstream (int64)."""
    bit = element * bits
    word = bit >> 5
    low = ops.word(stream[word])
    if 32 % bits:  # codes may straddle two words: read a 64-bit window
        low = low | (ops.word(stream[word + 1]) << 32)
    return (low >> (bit & 31)) & ((1 << bits) - 1)


def scale_at(ops: Ops, stored: Any, meta: Meta) -> Any:
    """A scale decoded from its stored form to float32."""
    if meta.scale == 0:
        return stored
    if meta.scale == 1:
        return ops.float32(stored)
    code = ops.int64(stored)
    if meta.scale == 2:  # e4m3 normal: exponent bias 7 -> 127, mantissa 3 -> 23 bits
        return ops.bits_to_float32((((code >> 3) + 120) << 23) | ((code & 7) << 20))
    return ops.bits_to_float32(code << 23)  # e8m0: 2^(code - 127)


def weight_at(ops: Ops, tensors: dict[str, Any], meta: Meta, row: Any, col: Any) -> Any:
    """W[row, col] as float32; `row` and `col` broadcast (torch) or are scalars (TE)."""
    row, col = ops.int64(row), ops.int64(col)
    scales = tensors["scales"]  # [rows or 1, blocks or 1], as are the zero points
    scale_row = row if int(scales.shape[0]) > 1 else 0
    block = col // meta.block if int(scales.shape[1]) > 1 else 0
    scale = scale_at(ops, scales[scale_row, block], meta)

    def element(index: Any) -> Any:
        if meta.element == VALUE:
            return tensors["codes"][index]
        code = code_at(ops, tensors["codes"], meta.bits, index)
        if meta.element == TABLE:
            return tensors["table"][code] * scale
        if meta.element == OFFSET:
            return ops.float32(code - (1 << (meta.bits - 1))) * scale
        assert meta.element == ZERO
        zero_index = scale_row * int(scales.shape[1]) + block
        zero = code_at(ops, tensors["zeros"], meta.bits, zero_index)
        return ops.float32(code - zero) * scale

    if not meta.n:
        return element(row * meta.cols + col)
    group, position = col // meta.m, col % meta.m
    first = (row * (meta.cols // meta.m) + group) * meta.n
    value = None
    for slot in range(meta.n):
        kept = ops.equal(code_at(ops, tensors["index"], meta.index_bits, first + slot), position)
        term = ops.where(kept, element(first + slot), 0.0)
        value = term if value is None else value + term
    return value
