"""The one table of numeric formats: names, widths and value grids.

The language validates names against this table, the passes quantize onto its grids and the
backends decide from it how a format is stored and executed. It is plain Python so that
`qspec check` stays fast and free of heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist
from typing import Literal

Family = Literal["int", "uint", "fp", "nf"]


@dataclass(frozen=True)
class Format:
    """A weight or activation element format.

    `grid` lists every representable value in ascending order (for integer formats, the codes
    themselves); a quantizer maps `w / scale` (plus a zero point for asymmetric integers) to the
    nearest grid point.
    """

    name: str
    family: Family
    bits: int
    exponent_bits: int = 0
    mantissa_bits: int = 0
    summary: str = ""

    @property
    def is_integer(self) -> bool:
        return self.family in ("int", "uint")

    @property
    def is_float(self) -> bool:
        return self.family == "fp"

    @cached_property
    def grid(self) -> tuple[float, ...]:
        if self.family == "int":
            half = 1 << (self.bits - 1)
            return tuple(float(v) for v in range(-half, half))
        if self.family == "uint":
            return tuple(float(v) for v in range(1 << self.bits))
        if self.family == "nf":
            return normal_float_grid(self.bits)
        return minifloat_grid(self.exponent_bits, self.mantissa_bits, fn=self.bits == 8)

    @property
    def max_value(self) -> float:
        return max(abs(v) for v in self.grid)


def minifloat_grid(exponent_bits: int, mantissa_bits: int, *, fn: bool) -> tuple[float, ...]:
    """All finite values of a sign/exponent/mantissa format with IEEE-style bias and subnormals.

    `fn` selects the OCP "finite, NaN only at all-ones" encoding of e4m3fn, whose top binade keeps
    every mantissa but the all-ones one (so the maximum is 448, not 240). e5m2 follows IEEE (the
    top exponent is inf/NaN); fp4 formats have neither inf nor NaN and use every code.
    """
    bias = (1 << (exponent_bits - 1)) - 1
    top = (1 << exponent_bits) - 1
    values: set[float] = set()
    for exponent in range(top + 1):
        for mantissa in range(1 << mantissa_bits):
            if exponent_bits == 5 and exponent == top:
                continue  # e5m2: inf and NaN
            if (
                fn
                and exponent_bits == 4
                and exponent == top
                and mantissa == (1 << mantissa_bits) - 1
            ):
                continue  # e4m3fn: NaN
            if exponent == 0:
                value = mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias)
            else:
                value = (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)
            values.update((value, -value))
    return tuple(sorted(values))


def normal_float_grid(bits: int) -> tuple[float, ...]:
    """NormalFloat (QLoRA): quantiles of N(0, 1), asymmetric so that zero is exact.

    2^(b-1) positive and 2^(b-1) - 1 negative quantiles are taken between the 0.5 point and an
    outer quantile chosen so the extreme bins carry equal mass, then scaled to [-1, 1] and rounded
    to float32. Within a few float32 ulps of the table published with QLoRA.
    """
    import struct

    outer = 1 - (1 / 30 + 1 / 32) / 2  # 0.9677083: between the half-bins of 15 and 16 levels
    normal = NormalDist()

    def quantiles(count: int) -> list[float]:
        step = (outer - 0.5) / count
        return [normal.inv_cdf(outer - i * step) for i in range(count)]

    half = 1 << (bits - 1)
    positive = quantiles(half)
    negative = [-q for q in quantiles(half - 1)]
    peak = max(positive)
    values = sorted([0.0, *(v / peak for v in positive), *(v / peak for v in negative)])

    def to_float32(value: float) -> float:
        rounded: float = struct.unpack("f", struct.pack("f", value))[0]
        return rounded

    return tuple(to_float32(v) for v in values)


WEIGHT_FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("int2", "int", 2, summary="signed 2-bit integer"),
        Format("int3", "int", 3, summary="signed 3-bit integer"),
        Format("int4", "int", 4, summary="signed 4-bit integer"),
        Format("int8", "int", 8, summary="signed 8-bit integer"),
        Format("uint2", "uint", 2, summary="unsigned 2-bit integer with zero point"),
        Format("uint3", "uint", 3, summary="unsigned 3-bit integer with zero point"),
        Format("uint4", "uint", 4, summary="unsigned 4-bit integer with zero point"),
        Format("uint8", "uint", 8, summary="unsigned 8-bit integer with zero point"),
        Format("fp8_e4m3", "fp", 8, 4, 3, summary="OCP fp8 e4m3fn, max 448"),
        Format("fp8_e5m2", "fp", 8, 5, 2, summary="OCP fp8 e5m2, max 57344"),
        Format("fp4_e2m1", "fp", 4, 2, 1, summary="fp4 e2m1 (MXFP4/NVFP4 element)"),
        Format("fp4_e1m2", "fp", 4, 1, 2, summary="fp4 e1m2 (LLM-FP4 search space)"),
        Format("fp4_e3m0", "fp", 4, 3, 0, summary="fp4 e3m0 (LLM-FP4 search space)"),
        Format("nf4", "nf", 4, summary="4-bit NormalFloat (QLoRA)"),
    )
}

# Short names users write; the IR always holds the full name.
FORMAT_ALIASES: dict[str, str] = {"fp8": "fp8_e4m3", "fp4": "fp4_e2m1"}

ACTIVATION_FORMATS: tuple[str, ...] = ("int8", "uint8", "fp8_e4m3", "fp8_e5m2")

# Formats with the same width and different exponent/mantissa split, for `search format`.
FLOAT_FAMILIES: dict[int, tuple[str, ...]] = {
    8: ("fp8_e4m3", "fp8_e5m2"),
    4: ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0"),
}

# Formats scales may be stored in; e8m0 is the power-of-two scale of the OCP MX formats.
SCALE_FORMATS: dict[str, str] = {
    "fp32": "IEEE float32",
    "fp16": "IEEE float16",
    "fp8": "fp8 e4m3 (as NVFP4 stores block scales)",
    "e8m0": "8-bit power of two (OCP MX block scale)",
}


def weight_format(name: str) -> Format | None:
    """The format a user-written name (or alias) denotes, or None."""
    return WEIGHT_FORMATS.get(FORMAT_ALIASES.get(name, name))
