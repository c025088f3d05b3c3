"""Reference quantize, dequantize and bit packing: the numerics every pass and backend share.

A weight is 2-D `[rows, cols]`: rows are output channels, cols the reduction dimension. Blocks
(groups) run along cols, contiguous, `n_blocks = ceil(cols / group_size)`, the last one possibly
partial. "channel" is one block per row; "tensor" is one scale for everything, materialised as
`[rows, 1]` with equal values so that every backend reads scales as `[rows, n_blocks]`.

`quantize(weight, spec, clip)` = `fit_scales` (per-block scales and zero points) followed by
`quantize_values` (per-element nearest code for given scales; GPTQ-style passes call it a column at
a time). `Quantized.dequantize` / `dequantize_values` are the definition, quantization its exact
inverse:

    value = decode(code) * s            symmetric int, fp and nf formats
    value = (code - z) * s              asymmetric int/uint formats (z: per-block zero point)

computed in float32 (`Quantized.dequantize`). `quantize` returns, for every element, the code whose
dequantized float32 value is nearest to the float32 weight, over the codes the spec admits; exact
ties go to the even code (for floats that is the even mantissa, i.e. IEEE round-half-even; for
integers the even integer, as `np.rint`). It does not trust `w / s` alone: it rounds that, then
compares the actual float32 products of the neighbouring codes, so it agrees with `dequantize`
bit for bit.

Codes are unsigned bytes:
- int (symmetric): offset binary, code = q + 2^(b-1), q in [-qmax, qmax], qmax = 2^(b-1) - 1. The
  code 0 (q = -2^(b-1)) is never produced, so the grid is sign-symmetric; ONNX Runtime's
  MatMulNBits reads these codes with its default zero point 2^(b-1).
- int/uint (asymmetric): code in [0, 2^b - 1], with a stored zero point per block.
- fp: the real bit pattern, sign bit highest, then exponent, then mantissa (e4m3fn: bias 7, no
  inf, NaN = S.1111.111; e5m2: IEEE bias 15; fp4: bias 2^(e-1) - 1, all codes finite). Codes
  match `ml_dtypes`; NaN/inf codes are never produced and out-of-range values saturate to ±max.
- nf4: index into the ascending 16-value grid (0 = -1.0, 7 = 0.0, 15 = 1.0).

Scales. A block's ideal scale is range / qmax, with range = absmax * clip (asymmetric specs:
(max(w, 0) - min(w, 0)) * clip, zero point z = round(-min(w, 0) * clip / s)) and qmax the grid
max (2^(b-1) - 1 for symmetric int, 2^b - 1 for asymmetric specs). It is then stored as:
- fp32, fp16, fp8 (e4m3fn): the smallest representable scale >= the ideal one, so the clipped
  range always fits the grid and nothing clips that `clip` did not ask to clip. fp8 scales are
  held in the normal e4m3 range [2^-6, 448]: a larger ideal scale saturates at 448 and the block's
  outliers clamp to ±max, a smaller one becomes 2^-6 and small elements round to zero (normalise
  the tensor first, as NVFP4 does with its fp32 global scale). fp16 is held in [2^-24, 65504].
- e8m0: the OCP MX rule, s = 2^(floor(log2(range)) - floor(log2(qmax))); elements in the top
  binade above qmax clamp. nf4 is the exception: its grid max is 1 and its top step wide, so
  the power of two is rounded up instead (no clamping).
- An all-zero block gets scale 1 and the code of zero. Codes are always computed from the
  rounded scale, so `(codes, scales, zero_points)` are the reference.

Packing (`pack`, along the last axis): a little-endian bit stream, code k in bits [b*k, b*k + b)
of the stream, i.e. 8-bit one code per byte; 4-bit two per byte, low nibble first (byte i =
c[2i] | c[2i+1] << 4); 2-bit four per byte, lowest bits first; 3-bit truly packed, every 8 codes
fill 3 bytes as a little-endian 24-bit word with code k in bits [3k, 3k + 3). The last axis is
padded with zero codes to a whole unit (8 / gcd(b, 8) codes). This is ONNX Runtime's MatMulNBits
and GatherBlockQuantized layout for 2/4/8 bits when applied per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal, get_args

import numpy as np

from qspec.dsl.formats import SCALE_FORMATS, WEIGHT_FORMATS, Format

Granularity = Literal["tensor", "channel", "group"]
ScaleFormat = Literal["fp32", "fp16", "fp8", "e8m0"]
Rounding = Literal["nearest", "up", "down"]

SCALE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "fp8": 1, "e8m0": 1}
# The spec's words for granularities and scale formats, as the types above.
GRANULARITIES: dict[str, Granularity] = {name: name for name in get_args(Granularity)}
SCALES: dict[str, ScaleFormat] = {name: name for name in get_args(ScaleFormat)}
_CHUNK = 1 << 18  # elements per step of the nearest-code search: bounds its temporary memory


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: element format, block layout, zero points, scale format."""

    format: Format
    granularity: Granularity
    group_size: int | None = None
    symmetric: bool = True
    scale_format: ScaleFormat = "fp32"

    def __post_init__(self) -> None:
        if self.format.family == "uint" and self.symmetric:
            raise ValueError(f"{self.format.name} has no sign: it needs symmetric=False")
        if not self.format.is_integer and not self.symmetric:
            raise ValueError(f"{self.format.name} has no zero point: it must be symmetric")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"unknown granularity {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError("group_size is required for, and only for, granularity 'group'")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, not {self.group_size}")
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"unknown scale format {self.scale_format!r}")

    def block_size(self, cols: int) -> int:
        """Columns per block: the group size, or all columns for channel and tensor."""
        return min(self.group_size, cols) if self.group_size is not None else cols

    def n_blocks(self, cols: int) -> int:
        return -(-cols // self.block_size(cols))


@dataclass(frozen=True)
class Quantized:
    """A quantized weight: per-element codes plus per-block scales (and zero points)."""

    codes: np.ndarray  # uint8 [rows, cols]
    scales: np.ndarray  # float32 [rows, n_blocks], exactly representable in spec.scale_format
    zero_points: np.ndarray | None  # uint8 [rows, n_blocks], asymmetric integer specs only
    spec: QuantSpec

    def dequantize(self) -> np.ndarray:
        """The float32 weight the codes stand for: the definition `quantize` inverts."""
        cols = self.codes.shape[1]
        block = self.spec.block_size(cols)
        z = None if self.zero_points is None else expand(self.zero_points, block, cols)
        return dequantize_values(self.codes, expand(self.scales, block, cols), self.spec, z)


def expand(blockwise: np.ndarray, block: int, cols: int) -> np.ndarray:
    """Per-block values [rows, n_blocks] repeated to per-element [rows, cols]."""
    return np.repeat(blockwise, block, axis=1)[:, :cols]


# --- element codes -------------------------------------------------------------------------------


@cache
def code_values(fmt: Format) -> np.ndarray:
    """float32 [2^bits]: the value of every code (e5m2 has ±inf and NaN codes, e4m3fn NaN ones).

    Built from the bit layout, independently of `fmt.grid` (the tests check the two agree).
    """
    codes = np.arange(1 << fmt.bits)
    if fmt.family == "int":
        values = codes - (1 << (fmt.bits - 1))
    elif fmt.family == "uint":
        values = codes
    elif fmt.family == "nf":
        values = np.array(fmt.grid)
    else:
        e, m = fmt.exponent_bits, fmt.mantissa_bits
        sign = np.where(codes >> (fmt.bits - 1) & 1, -1.0, 1.0)
        exponent, mantissa = codes >> m & ((1 << e) - 1), codes & ((1 << m) - 1)
        bias = (1 << (e - 1)) - 1
        normal = (1 + mantissa / (1 << m)) * np.exp2(exponent - bias)
        subnormal = mantissa / (1 << m) * 2.0 ** (1 - bias)
        values = sign * np.where(exponent == 0, subnormal, normal)
        if fmt.bits == 8 and e == 5:
            values[exponent == 31] = np.where(mantissa == 0, sign * np.inf, np.nan)[exponent == 31]
        elif fmt.bits == 8:
            values[(exponent == 15) & (mantissa == 7)] = np.nan  # e4m3fn NaN
    table = values.astype(np.float32)
    table.flags.writeable = False
    return table


@cache
def _levels(
    fmt: Format, role: Literal["encode", "symmetric", "asymmetric"]
) -> tuple[np.ndarray, np.ndarray]:
    """(ascending float32 levels, their uint8 codes) a quantizer may choose from.

    fp formats list magnitudes only (codes without the sign bit); the sign is added afterwards,
    which keeps the round trip sign-symmetric and gives -0 for small negatives, as ml_dtypes does.
    Asymmetric specs use the raw codes as levels, shifted by the zero point at use.
    """
    codes = np.arange(1 << fmt.bits)
    table = code_values(fmt)
    if fmt.is_float:
        codes = codes[: 1 << (fmt.bits - 1)]
        codes = codes[np.isfinite(table[codes])]
    elif role == "asymmetric":
        table = codes.astype(np.float32)
    elif role == "symmetric" and fmt.family == "int":
        codes = codes[1:]  # restricted range -qmax..qmax
    levels = table[codes]
    assert np.all(np.diff(levels) > 0)
    return levels, codes.astype(np.uint8)


def _nearest(
    w: np.ndarray, s: np.ndarray, levels: np.ndarray, codes: np.ndarray, z: np.ndarray | float = 0.0
) -> np.ndarray:
    """Per element, the code whose float32 value (level - z) * s is nearest w; ties to even code.

    `w / s + z` locates the element among the levels; the two levels around it and one more on
    each side are then compared by their actual float32 products, which settles every case where
    float rounding would make the division alone pick the wrong neighbour.
    """
    w64 = w.astype(np.float64)
    x = w64 / s + z
    idx = np.searchsorted(levels, x)
    cand = np.clip(idx + np.arange(-2, 2)[:, None], 0, len(levels) - 1)
    if isinstance(z, np.ndarray):
        values = (levels[cand] - z.astype(np.float32)) * s
    else:
        values = levels[cand] * s
    dist = np.abs(w64 - values.astype(np.float64))
    rank = np.where(dist == dist.min(axis=0), codes[cand] & 1, 2)
    best = np.take_along_axis(cand, rank.argmin(axis=0)[None], axis=0)[0]
    nearest: np.ndarray = codes[best]
    return nearest


def _quantize_elements(
    w: np.ndarray, s: np.ndarray, fmt: Format, role: str, z: np.ndarray | None = None
) -> np.ndarray:
    """Codes for float32 elements `w` with per-element float32 scales `s` (and zero points)."""
    levels, codes = _levels(fmt, role)
    shape = w.shape
    w, s = w.reshape(-1), np.broadcast_to(s, shape).reshape(-1)
    z = None if z is None else np.broadcast_to(z, shape).reshape(-1)
    out = np.empty(w.shape, np.uint8)
    for start in range(0, w.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        wp = np.abs(w[part]) if fmt.is_float else w[part]
        out[part] = _nearest(wp, s[part], levels, codes, 0.0 if z is None else z[part])
    if fmt.is_float:
        out |= np.signbit(w).astype(np.uint8) << (fmt.bits - 1)
    return out.reshape(shape)


def encode(values: np.ndarray, fmt: Format) -> np.ndarray:
    """uint8 codes of the grid values nearest `values` (ties to even code, saturating at ±max).

    Integer formats use their full range here (int4: -8..7); `quantize` restricts symmetric
    specs to -qmax..qmax.
    """
    v = np.asarray(values, dtype=np.float32)
    if not np.isfinite(v).all():
        raise ValueError("encode takes finite values")
    return _quantize_elements(v, np.ones_like(v), fmt, "encode")


def decode(codes: np.ndarray, fmt: Format) -> np.ndarray:
    """float32 values of codes, as ml_dtypes and ONNX read them (inf/NaN for those fp8 codes)."""
    return code_values(fmt)[np.asarray(codes, dtype=np.uint8)]


# --- scales --------------------------------------------------------------------------------------


@cache
def _scale_table(scale_format: str) -> tuple[np.ndarray, int]:
    """(ascending positive float64 values, code of the first one) of a narrow scale format."""
    if scale_format == "fp16":
        return np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64), 1
    if scale_format == "fp8":
        table = code_values(WEIGHT_FORMATS["fp8_e4m3"])[0x08:0x7F]  # normals 2^-6 .. 448
        return table.astype(np.float64), 0x08
    return np.exp2(np.arange(-127, 128, dtype=np.float64)), 0  # e8m0: code = exponent + 127


def round_scales(scales: np.ndarray, scale_format: str, mode: Rounding = "nearest") -> np.ndarray:
    """Positive scales rounded to values of `scale_format`, returned as float32.

    `nearest` ties to the even code (so fp16 and fp8 agree with a float cast); `up` and `down`
    round towards +inf and 0. Values beyond the format's range clamp to it: fp32 [2^-149, max],
    fp16 [2^-24, 65504], fp8 [2^-6, 448] (normal e4m3 only), e8m0 [2^-127, 2^127].
    """
    x = np.asarray(scales, dtype=np.float64)
    if not np.all(np.isfinite(x) & (x > 0)):
        raise ValueError("scales must be positive and finite")
    if scale_format == "fp32":
        info = np.finfo(np.float32)
        x = np.clip(x, float(info.smallest_subnormal), float(info.max))
        f = x.astype(np.float32)
        if mode == "up":
            f = np.where(f < x, np.nextafter(f, np.float32(np.inf)), f)
        elif mode == "down":
            f = np.where(f > x, np.nextafter(f, np.float32(0)), f)
        return np.asarray(f, dtype=np.float32)
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"unknown scale format {scale_format!r}")
    table, first_code = _scale_table(scale_format)
    x = np.clip(x, table[0], table[-1])
    i = np.searchsorted(table, x)  # table[i - 1] < x <= table[i]
    above, below = table[i], table[np.maximum(i - 1, 0)]
    if mode == "up":
        out = above
    elif mode == "down":
        out = np.where(above == x, above, below)
    else:  # adjacent table values are within a factor 2, so both differences are exact
        d_above, d_below = above - x, x - below
        even_above = (i + first_code) % 2 == 0
        out = np.where((d_above < d_below) | ((d_above == d_below) & even_above), above, below)
    return np.asarray(out, dtype=np.float32)


def _qmax(spec: QuantSpec) -> float:
    """The grid extent the scale maps the block's range onto."""
    if not spec.symmetric:
        return float((1 << spec.format.bits) - 1)
    if spec.format.family == "int":
        return float((1 << (spec.format.bits - 1)) - 1)
    return spec.format.max_value


def _choose_scales(extent: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """float32 scales for blocks whose (clipped) range spans `extent`; see the module docstring."""
    qmax = _qmax(spec)
    extent = np.where(extent > 0, extent, qmax)  # all-zero block: scale 1
    if spec.scale_format == "e8m0" and spec.format.family != "nf":
        emax = math.frexp(qmax)[1] - 1  # floor(log2(qmax)), exact
        return round_scales(extent / 2.0**emax, "e8m0", "down")
    return round_scales(extent / qmax, spec.scale_format, "up")


# --- quantize ------------------------------------------------------------------------------------


def fit_scales(
    weight: np.ndarray, spec: QuantSpec, clip: float | np.ndarray = 1.0
) -> tuple[np.ndarray, np.ndarray | None]:
    """The per-block (scales, zero points) `quantize` uses: float32 and uint8 [rows, n_blocks].

    `clip` (scalar, or broadcastable to [rows, n_blocks]) multiplies each block's range before the
    scale is chosen: a ratio below 1 trades clamping the outliers for a finer grid. GPTQ-style
    passes fit these once on the original weight and then call `quantize_values` column by column.
    """
    w = _check_weight(weight)
    rows, cols = w.shape
    block, n_blocks = spec.block_size(cols), spec.n_blocks(cols)
    ratio = np.broadcast_to(np.asarray(clip, dtype=np.float64), (rows, n_blocks))
    if not np.all(np.isfinite(ratio) & (ratio > 0)):
        raise ValueError("clip ratios must be positive and finite")

    if spec.granularity == "tensor":
        if np.ptp(ratio) != 0:
            raise ValueError("a tensor-granularity spec takes one clip ratio")
        lo = np.full((rows, 1), min(float(w.min()), 0.0))
        hi = np.full((rows, 1), max(float(w.max()), 0.0))
    else:  # zero padding leaves both ends alone: every range includes 0
        padded = np.pad(w, ((0, 0), (0, n_blocks * block - cols)))
        blocks = padded.reshape(rows, n_blocks, block).astype(np.float64)
        lo, hi = np.minimum(blocks.min(axis=-1), 0.0), np.maximum(blocks.max(axis=-1), 0.0)
    lo, hi = lo * ratio, hi * ratio

    if spec.symmetric:
        return _choose_scales(np.maximum(-lo, hi), spec), None
    scales = _choose_scales(hi - lo, spec)
    zmax = (1 << spec.format.bits) - 1
    return scales, np.clip(np.rint(-lo / scales), 0, zmax).astype(np.uint8)


def quantize_values(
    values: np.ndarray, scales: np.ndarray, spec: QuantSpec, zero_points: np.ndarray | None = None
) -> np.ndarray:
    """uint8 codes of float32 `values` on the grid of given per-element scales (and zero points,
    for asymmetric specs), both broadcast to `values`: the nearest code, ties to the even one."""
    v = np.asarray(values, dtype=np.float32)
    s = np.asarray(scales, dtype=np.float32)
    if spec.symmetric != (zero_points is None):
        raise ValueError("zero points go with, and only with, asymmetric specs")
    role = "symmetric" if spec.symmetric else "asymmetric"
    return _quantize_elements(v, s, spec.format, role, zero_points)


def dequantize_values(
    codes: np.ndarray, scales: np.ndarray, spec: QuantSpec, zero_points: np.ndarray | None = None
) -> np.ndarray:
    """float32 values of codes with per-element scales (and zero points): the reference."""
    s = np.asarray(scales, dtype=np.float32)
    if zero_points is None:
        return decode(codes, spec.format) * s
    c = np.asarray(codes, dtype=np.uint8).astype(np.float32)
    return (c - np.asarray(zero_points, dtype=np.uint8).astype(np.float32)) * s


def quantize(weight: np.ndarray, spec: QuantSpec, clip: float | np.ndarray = 1.0) -> Quantized:
    """Round-to-nearest quantization of a 2-D weight onto `spec`'s grid (scales by `fit_scales`).

    The weight is taken as float32.
    """
    w = _check_weight(weight)
    scales, zero_points = fit_scales(w, spec, clip)
    cols = w.shape[1]
    block = spec.block_size(cols)
    z = None if zero_points is None else expand(zero_points, block, cols)
    codes = quantize_values(w, expand(scales, block, cols), spec, z)
    return Quantized(codes, scales, zero_points, spec)


def _check_weight(weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"quantize takes a non-empty 2-D weight, not shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weight has NaN or inf")
    return w


# --- packing -------------------------------------------------------------------------------------


def _unit(bits: int) -> int:
    """Codes per whole packing unit: 8 codes (3 bytes) for 3-bit, 2 for 4-bit, 1 for 8-bit."""
    return 8 // math.gcd(bits, 8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack b-bit codes along the last axis into bytes (layout in the module docstring)."""
    c = np.asarray(codes)
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if c.size and (c.min() < 0 or c.max() >= 1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    c = c.astype(np.uint8)
    if bits == 8:
        return c.copy()
    count = c.shape[-1]
    pad = -count % _unit(bits)
    c = np.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, pad)])
    stream = np.unpackbits(c[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = stream.reshape(*c.shape[:-1], (count + pad) * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def nbytes(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, int]:
    """Theoretical minimum storage of a quantized weight of `shape`, by part.

    Codes take bits each (rounded up to whole bytes once for the tensor), scales their format's
    width (one scale for tensor granularity), zero points bits each, packed.
    """
    rows, cols = shape
    bits = spec.format.bits
    n_scales = 1 if spec.granularity == "tensor" else rows * spec.n_blocks(cols)
    sizes = {
        "codes": -(-rows * cols * bits // 8),
        "scales": n_scales * SCALE_BYTES[spec.scale_format],
        "zero_points": 0 if spec.symmetric else -(-n_scales * bits // 8),
    }
    return {**sizes, "total": sum(sizes.values())}
