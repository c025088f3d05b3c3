"""How a compressed weight is stored in a TVM artifact: every table a flat little-endian bitstream
of b-bit codes in 32-bit words, read by one decode expression shared by the kernels and their
torch reference.

| tensor  | dtype   | holds                                                               |
|---------|---------|---------------------------------------------------------------------|
| codes   | int32   | the codes row-major; with N:M sparsity only the N kept per group    |
|         | float32 | (sparse float weights: the kept values themselves)                  |
| scales  | float32 | fp32 scales [rows or 1, blocks]; fp16 ones as float16; fp8 (e4m3    |
|         | float16 | normals) and e8m0 ones as their 8-bit codes                         |
|         | uint8   |                                                                     |
| zeros   | int32   | b-bit zero points [rows, blocks], bitstream (asymmetric only)       |
| table   | float32 | value of each code (fp8, fp4, nf4: formats that are not integers)   |
| index   | int32   | log2(M)-bit position of each kept element in its group (N:M only)   |

A bitstream ends with one spare word so a code that straddles two words (3-bit) is read as a
64-bit window without a bounds check. Stored bytes are the theoretical minimum plus at most
seven bytes per stream.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from qspec.compiler.numerics import Quantized, code_values, decode, encode, pack
from qspec.compiler.qmodel import CompressedLayer
from qspec.dsl.formats import WEIGHT_FORMATS

# Kinds of element decode: (code - zero) * s, (code - 2^(b-1)) * s, table[code] * s, value.
ZERO, OFFSET, TABLE, VALUE = range(4)
SCALE_KINDS = {"fp32": 0, "fp16": 1, "fp8": 2, "e8m0": 3}


@dataclass(frozen=True)
class Meta:
    """What the decode needs to know statically, passed to the custom ops as a list of ints."""

    rows: int
    cols: int
    bits: int  # code width (32 for VALUE)
    block: int  # columns per scale
    element: int  # ZERO | OFFSET | TABLE | VALUE
    scale: int  # SCALE_KINDS value
    n: int = 0  # N:M sparsity: N kept of every M columns (0: dense)
    m: int = 0

    def ints(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def of(cls, ints: list[int]) -> Meta:
        return cls(*(int(i) for i in ints))

    @property
    def index_bits(self) -> int:
        return max(1, (self.m - 1).bit_length())


@dataclass
class Packed:
    """The tensors of one stored weight, and its `Meta`."""

    meta: Meta
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None = None
    table: np.ndarray | None = None
    index: np.ndarray | None = None

    def tensors(self) -> dict[str, np.ndarray | None]:
        return {
            "codes": self.codes,
            "scales": self.scales,
            "zeros": self.zeros,
            "table": self.table,
            "index": self.index,
        }


def words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Flat b-bit codes as an int32 bitstream with one spare word."""
    flat = np.asarray(codes, np.uint8).reshape(1, -1)
    stream = pack(flat, bits).reshape(-1)[: -(-flat.size * bits // 8)]  # no whole-unit padding
    stream = np.concatenate([stream, np.zeros(-len(stream) % 4 + 4, np.uint8)])
    return stream.view("<u4").astype(np.int32, copy=False)


def nm_pattern(compressed: CompressedLayer) -> tuple[int, int] | None:
    """(N, M) when the weight is stored N:M-compressed: an N:M plan whose mask keeps at most N of
    every M columns, and M a power of two dividing the row."""
    sparsity, mask = compressed.plan.sparsity, compressed.mask
    if sparsity is None or mask is None or not sparsity.n or not sparsity.m:
        return None
    n, m = sparsity.n, sparsity.m
    if m & (m - 1) or compressed.layer.cols % m:
        return None
    groups = mask.reshape(mask.shape[0], -1, m)
    return (n, m) if groups.sum(-1).max() <= n else None


def pack_layer(compressed: CompressedLayer) -> Packed:
    """The stored form of a compressed layer's main weight (low-rank factors are separate)."""
    nm = nm_pattern(compressed)
    if compressed.weight is not None:
        return pack_quantized(compressed.weight, compressed.mask, nm)
    assert nm is not None and compressed.mask is not None, "dense float weights are not packed"
    values = compressed.compressed_weight()
    rows, cols = values.shape
    slots = kept_slots(compressed.mask, *nm)
    kept = np.take_along_axis(values.reshape(rows, -1, nm[1]), slots, -1)
    meta = Meta(rows, cols, 32, cols, VALUE, SCALE_KINDS["fp32"], *nm)
    return Packed(
        meta,
        kept.reshape(-1).astype(np.float32),
        np.ones((1, 1), np.float32),
        index=words(slots.reshape(-1), meta.index_bits),
    )


def pack_quantized(
    weight: Quantized, mask: np.ndarray | None = None, nm: tuple[int, int] | None = None
) -> Packed:
    """A quantized weight; with `nm`, only the codes `mask` keeps, and their positions."""
    spec, fmt = weight.spec, weight.spec.format
    rows, cols = weight.codes.shape
    scales, zeros = weight.scales, weight.zero_points
    if spec.granularity == "tensor":
        scales, zeros = scales[:1, :1], None if zeros is None else zeros[:1, :1]
    if zeros is not None:
        element = ZERO
    elif fmt.is_integer:
        element = OFFSET
    else:
        element = TABLE
    n, m = nm or (0, 0)
    scale = SCALE_KINDS[spec.scale_format]
    meta = Meta(rows, cols, fmt.bits, spec.block_size(cols), element, scale, n, m)
    codes, index = weight.codes, None
    if nm is not None:
        assert mask is not None
        slots = kept_slots(mask, n, m)
        codes = np.take_along_axis(codes.reshape(rows, -1, m), slots, -1)
        index = words(slots.reshape(-1), meta.index_bits)
    table = np.nan_to_num(code_values(fmt)).astype(np.float32) if element == TABLE else None
    return Packed(
        meta,
        words(codes.reshape(-1), fmt.bits),
        scale_storage(scales, spec.scale_format),
        None if zeros is None else words(zeros.reshape(-1), fmt.bits),
        table,
        index,
    )


def kept_slots(mask: np.ndarray, n: int, m: int) -> np.ndarray:
    """[rows, cols/M, N] positions of the kept columns of each group, ascending; groups with
    fewer than N kept are filled with pruned positions (whose value is zero)."""
    groups = mask.reshape(mask.shape[0], -1, m)
    order = np.argsort(~groups, axis=-1, kind="stable")[..., :n]  # kept first, in order
    return np.sort(order, axis=-1).astype(np.uint8)


def scale_storage(scales: np.ndarray, scale_format: str) -> np.ndarray:
    """Scales (exact in their format, as quantize leaves them) in the dtype the kernel reads."""
    scales = np.ascontiguousarray(scales, np.float32)
    if scale_format == "fp32":
        return scales
    if scale_format == "fp16":
        return scales.astype(np.float16)
    if scale_format == "e8m0":
        exponent = np.frexp(scales)[1] - 1  # scale = 2^exponent exactly
        return (exponent + 127).astype(np.uint8)
    codes = encode(scales, WEIGHT_FORMATS["fp8_e4m3"])
    assert np.array_equal(decode(codes, WEIGHT_FORMATS["fp8_e4m3"]), scales), "fp8 scales are exact"
    return codes
