"""Independent references the tests check production code against (not shipped: nothing in
the product needs them)."""

from __future__ import annotations

import numpy as np


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` b-bit codes of each packed row: the inverse of `numerics.pack`."""
    p = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return p[..., :count].copy()
    if p.shape[-1] * 8 < count * bits:
        raise ValueError(f"{p.shape[-1]} bytes hold fewer than {count} {bits}-bit codes")
    stream = np.unpackbits(p, axis=-1, bitorder="little")[..., : count * bits]
    stream = stream.reshape(*p.shape[:-1], count, bits)
    return np.packbits(stream, axis=-1, bitorder="little")[..., 0]


def packed_size(count: int, bits: int) -> int:
    """Bytes `pack` produces for `count` codes: whole units of 8 / gcd(bits, 8) codes."""
    unit = 8 // np.gcd(bits, 8)
    return int(-(-count // unit) * unit * bits // 8)


def weighted_error(error: np.ndarray, H: np.ndarray, B: np.ndarray, A: np.ndarray) -> float:
    """tr((E - B A) H (E - B A)ᵀ) in float64: the output error EoRA minimises."""
    d = np.asarray(error, np.float64) - np.asarray(B, np.float64) @ np.asarray(A, np.float64)
    return float(np.sum((d @ np.asarray(H, np.float64)) * d))
