"""Reference numerics against brute force, ml_dtypes and hand-computed bytes.

The brute-force reference here is deliberately naive: it decodes every code from its bit layout
in plain Python, dequantizes all of them with the quantizer's (rounded) scale and zero point, and
takes the closest. `quantize` must land on a code exactly that close.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import packed_size, unpack

from qspec.compiler.numerics import (
    Quantized,
    QuantSpec,
    code_values,
    decode,
    dequantize_values,
    encode,
    fit_scales,
    nbytes,
    pack,
    quantize,
    quantize_values,
    round_scales,
)
from qspec.dsl.formats import SCALE_FORMATS, WEIGHT_FORMATS, Format

FORMATS = list(WEIGHT_FORMATS.values())
ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
GRANULARITIES = [("tensor", None), ("channel", None), ("group", 32), ("group", 16), ("group", 7)]


def symmetries(fmt: Format) -> list[bool]:
    return {"int": [True, False], "uint": [False]}.get(fmt.family, [True])


SPECS = [
    QuantSpec(fmt, gran, size, sym, sf)
    for fmt in FORMATS
    for sym in symmetries(fmt)
    for gran, size in GRANULARITIES
    for sf in SCALE_FORMATS
]


def spec_id(spec: QuantSpec) -> str:
    gran = f"g{spec.group_size}" if spec.group_size else spec.granularity
    return f"{spec.format.name}-{gran}-{'sym' if spec.symmetric else 'asym'}-{spec.scale_format}"


# --- an independent decoder and the brute-force quantizer -----------------------------------------


def naive_value(fmt: Format, code: int) -> float | None:
    """Value of one code from the bit layout; None for NaN/inf codes."""
    if fmt.family == "int":
        return float(code - 2 ** (fmt.bits - 1))
    if fmt.family == "uint":
        return float(code)
    if fmt.family == "nf":
        return fmt.grid[code]
    e, m = fmt.exponent_bits, fmt.mantissa_bits
    sign = -1.0 if code >> (fmt.bits - 1) else 1.0
    exponent, mantissa = (code >> m) % 2**e, code % 2**m
    bias = 2 ** (e - 1) - 1
    if fmt.name == "fp8_e5m2" and exponent == 31:
        return None
    if fmt.name == "fp8_e4m3" and exponent == 15 and mantissa == 7:
        return None
    if exponent == 0:
        return sign * mantissa / 2**m * 2.0 ** (1 - bias)
    return sign * (1 + mantissa / 2**m) * 2.0 ** (exponent - bias)


def admissible(spec: QuantSpec) -> list[int]:
    """Codes a quantizer may emit: finite ones; symmetric ints use -qmax..qmax only."""
    fmt = spec.format
    codes = [c for c in range(2**fmt.bits) if naive_value(fmt, c) is not None]
    if fmt.family == "int" and spec.symmetric:
        codes.remove(0)
    return codes


def expand_blocks(values: np.ndarray, spec: QuantSpec, cols: int) -> np.ndarray:
    block = cols if spec.group_size is None else spec.group_size
    return np.repeat(values, block, axis=1)[:, :cols]


def check_against_brute_force(w: np.ndarray, spec: QuantSpec, clip=1.0) -> None:
    q = quantize(w, spec, clip)
    rows, cols = w.shape
    fmt = spec.format
    n_blocks = 1 if spec.group_size is None else -(-cols // spec.group_size)
    assert q.codes.dtype == np.uint8 and q.codes.shape == w.shape
    assert q.scales.dtype == np.float32 and q.scales.shape == (rows, n_blocks)
    assert_representable(q.scales, spec.scale_format)
    if spec.granularity == "tensor":
        assert np.all(q.scales == q.scales[0, 0])

    s = expand_blocks(q.scales, spec, cols)
    codes = admissible(spec)
    if spec.symmetric:
        assert q.zero_points is None
        levels = np.array([naive_value(fmt, c) for c in codes], np.float32)
        every = levels[None, None, :] * s[..., None]
    else:
        assert q.zero_points is not None and q.zero_points.shape == (rows, n_blocks)
        assert q.zero_points.dtype == np.uint8 and q.zero_points.max() < 2**fmt.bits
        z = expand_blocks(q.zero_points, spec, cols).astype(np.float32)
        every = (np.array(codes, np.float32)[None, None, :] - z[..., None]) * s[..., None]
    assert every.dtype == np.float32
    w64 = w.astype(np.float64)
    dist = np.abs(w64[..., None] - every.astype(np.float64))
    best = dist.min(axis=-1)
    even_nearest = ((dist == best[..., None]) & (np.array(codes) % 2 == 0)).any(axis=-1)

    deq = q.dequantize()
    assert deq.dtype == np.float32 and np.isfinite(deq).all()
    assert np.isin(q.codes, codes).all(), "a code outside the admissible set"
    chosen = every[
        np.arange(rows)[:, None], np.arange(cols)[None, :], np.searchsorted(codes, q.codes)
    ]
    assert np.array_equal(deq, chosen)
    assert np.array_equal(np.abs(w64 - deq.astype(np.float64)), best), "not the nearest code"
    assert np.all(q.codes[even_nearest] % 2 == 0), "a tie not broken to the even code"

    if fmt.is_integer:  # inside the grid's span the error is at most half a step
        inside = (w >= every.min(axis=-1)) & (w <= every.max(axis=-1))
        slack = np.spacing(np.abs(w)) + np.spacing(s)
        assert np.all(np.abs(w - deq)[inside] <= s[inside] / 2 + slack[inside])


def assert_representable(scales: np.ndarray, scale_format: str) -> None:
    assert np.all(np.isfinite(scales) & (scales > 0))
    if scale_format == "fp16":
        assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
    elif scale_format == "fp8":
        fp8 = scales.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        assert np.array_equal(fp8, scales) and scales.min() >= 2**-6 and scales.max() <= 448
    elif scale_format == "e8m0":
        mantissa, _ = np.frexp(scales)
        assert np.all(mantissa == 0.5)


def sample_weight(seed: int, rows: int = 6, cols: int = 45) -> np.ndarray:
    """Gaussian rows with outliers, an all-zero row, a row of dyadic values (exact ties) and an
    all-positive row (asymmetric zero point at the end)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
    w[0, 3] = 0.9
    w[1] = 0
    w[2] = rng.integers(-32, 33, cols) / 8
    w[3] = np.abs(w[3]) + 0.01
    w[4, :20] = 0  # a zero block at every group size
    w[5] *= 1e-3
    return w


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_quantize_is_nearest_grid_point(spec: QuantSpec) -> None:
    w = sample_weight(len(spec_id(spec)))
    check_against_brute_force(w, spec)
    n_blocks = 1 if spec.group_size is None else -(-w.shape[1] // spec.group_size)
    if spec.granularity == "tensor":
        check_against_brute_force(w, spec, clip=0.6)
    else:
        ratios = np.random.default_rng(1).uniform(0.3, 1.0, (w.shape[0], n_blocks))
        check_against_brute_force(w, spec, clip=ratios)


@settings(max_examples=150, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    rows=st.integers(1, 4),
    cols=st.integers(1, 40),
    magnitude=st.sampled_from([1e-6, 1e-3, 0.1, 1.0, 1e3, 1e5]),
    dyadic=st.booleans(),
    clip=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_fuzz(spec, rows, cols, magnitude, dyadic, clip, seed) -> None:
    rng = np.random.default_rng(seed)
    if dyadic:
        w = rng.integers(-64, 65, (rows, cols)) / 16 * magnitude
    else:
        w = rng.standard_t(3, (rows, cols)) * magnitude
    check_against_brute_force(w.astype(np.float32), spec, clip)


@settings(max_examples=80, deadline=None)
@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**32 - 1))
def test_near_ties_follow_the_float32_products(spec: QuantSpec, seed: int) -> None:
    """Weights within an ulp of the midpoint of two dequantized values: only comparing the actual
    float32 products (not w / s) finds the nearest code for all of these."""
    spec = QuantSpec(spec.format, "channel", None, spec.symmetric, spec.scale_format)
    rng = np.random.default_rng(seed)
    w = (rng.normal(0, 1, (3, 64)) * np.exp2(rng.uniform(-20, 20))).astype(np.float32)
    q = quantize(w, spec)
    codes = np.array(admissible(spec), np.uint8)
    pick = rng.integers(0, len(codes) - 1, w.shape)
    lower = Quantized(codes[pick], q.scales, q.zero_points, spec).dequantize()
    upper = Quantized(codes[pick + 1], q.scales, q.zero_points, spec).dequantize()
    mid = ((lower.astype(np.float64) + upper) / 2).astype(np.float32)
    nudge = rng.integers(-1, 2, w.shape)  # one ulp down, none, one ulp up
    towards = np.where(nudge > 0, np.inf, -np.inf).astype(np.float32)
    mid = np.where(nudge == 0, mid, np.nextafter(mid, towards))
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    keep = (mid < lo) | (mid > hi) | (w == lo) | (w == hi)  # the range, so the scale, stays
    if spec.symmetric:
        amax = np.abs(w).max(axis=1, keepdims=True)
        keep = (np.abs(mid) > amax) | (np.abs(w) == amax)
    near_tie = np.where(keep, w, mid)
    assert np.array_equal(quantize(near_tie, spec).scales, q.scales)
    check_against_brute_force(near_tie, spec)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.group_size == 16], ids=spec_id)
def test_column_by_column_matches_quantize(spec: QuantSpec) -> None:
    """The GPTQ path: fit scales once, then round one column at a time."""
    w = sample_weight(7)
    q = quantize(w, spec)
    scales, zero_points = fit_scales(w, spec)
    assert np.array_equal(scales, q.scales)
    for j in range(w.shape[1]):
        z = None if zero_points is None else zero_points[:, j // 16]
        codes = quantize_values(w[:, j], scales[:, j // 16], spec, z)
        assert np.array_equal(codes, q.codes[:, j])
        deq = dequantize_values(codes, scales[:, j // 16], spec, z)
        assert np.array_equal(deq, q.dequantize()[:, j])
    with pytest.raises(ValueError):
        quantize_values(w, 1.0, spec, None if zero_points is not None else np.uint8(1))


# --- element encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_code_table_matches_grid_and_bit_layout(fmt: Format) -> None:
    table = code_values(fmt)
    assert len(table) == 2**fmt.bits
    for code, value in enumerate(table):
        expected = naive_value(fmt, code)
        assert not np.isfinite(value) if expected is None else value == expected
    finite = table[np.isfinite(table)]
    assert sorted(set(finite.tolist())) == list(fmt.grid)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_encode_decode_round_trip(fmt: Format) -> None:
    codes = np.array([c for c in range(2**fmt.bits) if naive_value(fmt, c) is not None], np.uint8)
    assert np.array_equal(encode(decode(codes, fmt), fmt), codes)


def test_nf4_and_int_codes() -> None:
    nf4, int4 = WEIGHT_FORMATS["nf4"], WEIGHT_FORMATS["int4"]
    assert decode(np.array([0, 7, 15]), nf4).tolist() == [-1.0, 0.0, 1.0]
    assert encode(np.array([-8, -1, 0, 7, 100]), int4).tolist() == [0, 7, 8, 15, 15]
    assert encode(np.array([0.5, 1.5, 2.5, -0.5]), int4).tolist() == [8, 10, 10, 8]  # to even


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.family != "nf"], ids=lambda f: f.name)
def test_ties_go_to_the_even_code(fmt: Format) -> None:
    grid = np.array(fmt.grid, np.float64)
    mid = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (grid[:-1] + grid[1:]) / 2)  # exact midpoints
    codes = encode(mid, fmt)
    assert np.all(codes % 2 == 0)
    assert np.all(np.isin(decode(codes, fmt), grid))


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_fp_codes_match_ml_dtypes(name: str) -> None:
    fmt, dtype = WEIGHT_FORMATS[name], ML_DTYPES[name]
    every = np.arange(2**fmt.bits, dtype=np.uint8)
    theirs = every.view(dtype).astype(np.float32)
    assert np.array_equal(decode(every, fmt), theirs, equal_nan=True)

    rng = np.random.default_rng(0)
    grid = np.array(fmt.grid)
    values = np.concatenate(
        [
            rng.uniform(-fmt.max_value, fmt.max_value, 4000),
            fmt.max_value * np.exp2(-rng.uniform(0, 30, 4000)) * rng.choice([-1, 1], 4000),
            (grid[:-1] + grid[1:]) / 2,  # ties
            grid,
            [0.0, -0.0, -1e-30],
        ]
    ).astype(np.float32)
    assert np.array_equal(encode(values, fmt), values.astype(dtype).view(np.uint8))


def test_encode_saturates() -> None:
    e4m3, e2m1 = WEIGHT_FORMATS["fp8_e4m3"], WEIGHT_FORMATS["fp4_e2m1"]
    assert encode(np.array([1e6, -1e6, 470.0]), e4m3).tolist() == [0x7E, 0xFE, 0x7E]
    assert encode(np.array([7.0, -100.0]), e2m1).tolist() == [0b0111, 0b1111]
    with pytest.raises(ValueError):
        encode(np.array([np.nan]), e4m3)


# --- scales --------------------------------------------------------------------------------------


def test_round_scales_fp16_is_a_float16_cast() -> None:
    x = np.exp2(np.random.default_rng(0).uniform(-23, 15.9, 20000))
    x = np.concatenate([x, [1.5 + 2.0**-11, 1.5 + 3 * 2.0**-11]])  # ties
    assert np.array_equal(round_scales(x, "fp16"), x.astype(np.float16).astype(np.float32))


def test_round_scales_fp8_matches_ml_dtypes() -> None:
    grid = np.array([v for v in WEIGHT_FORMATS["fp8_e4m3"].grid if v >= 2**-6])
    x = np.concatenate([np.exp2(np.random.default_rng(0).uniform(-6, 8.8, 20000)), grid])
    x = np.concatenate([x, (grid[:-1] + grid[1:]) / 2])
    ours = round_scales(x, "fp8")
    assert np.array_equal(ours, x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert round_scales(np.array([1e-9, 1e9]), "fp8").tolist() == [2**-6, 448.0]


@pytest.mark.parametrize("scale_format", sorted(SCALE_FORMATS))
def test_round_scales_modes(scale_format: str) -> None:
    x = np.exp2(np.random.default_rng(1).uniform(-5, 8, 2000))
    up = round_scales(x, scale_format, "up")
    down = round_scales(x, scale_format, "down")
    near = round_scales(x, scale_format)
    for r in (up, down, near):
        assert_representable(r, scale_format)
    assert np.all(down <= x) and np.all(x <= up)
    assert np.all((near == up) | (near == down))
    exact = round_scales(np.array([0.25, 1.0, 4.0]), scale_format, "up")
    assert exact.tolist() == [0.25, 1.0, 4.0]
    with pytest.raises(ValueError):
        round_scales(np.array([0.0]), scale_format)


def test_e8m0_follows_the_ocp_rule() -> None:
    w = np.array([[5.0, -1.0, 0.1, 0.0], [7.9, 0.0, 0.0, 0.0]], np.float32)
    q = quantize(w, QuantSpec(WEIGHT_FORMATS["fp4_e2m1"], "channel", scale_format="e8m0"))
    assert q.scales[:, 0].tolist() == [1.0, 1.0]  # 2^(floor(log2 amax) - 2)
    assert q.dequantize()[1, 0] == 6.0  # the top binade clamps to max
    q = quantize(w, QuantSpec(WEIGHT_FORMATS["int4"], "channel", scale_format="e8m0"))
    assert q.scales[:, 0].tolist() == [1.0, 1.0]  # qmax 7: 2^(2 - 2)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_zero_weight_is_exact(spec: QuantSpec) -> None:
    q = quantize(np.zeros((3, 20), np.float32), spec)
    assert np.all(q.scales == 1) and np.all(q.dequantize() == 0)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.group_size in (None, 16)], ids=spec_id)
def test_clip_shrinks_scales(spec: QuantSpec) -> None:
    w = sample_weight(3)
    full, clipped = quantize(w, spec).scales, quantize(w, spec, clip=0.5).scales
    assert np.all(clipped <= full)
    if not (spec.format.bits == 8 and spec.format.is_float and spec.scale_format == "fp8"):
        assert np.any(clipped < full)  # (fp8 elements' scales sit at the fp8 floor 2^-6 here)


@pytest.mark.parametrize(
    "spec",
    [s for s in SPECS if s.granularity == "channel" and s.scale_format != "e8m0"],
    ids=spec_id,
)
def test_scale_is_rounded_up_to_cover_the_range(spec: QuantSpec) -> None:
    """fp32/fp16/fp8 scales never shrink below range / qmax (within the fp8 scale range)."""
    w = sample_weight(5)
    q = quantize(w, spec)
    w64 = w.astype(np.float64)
    lo, hi = np.minimum(w64.min(axis=1), 0), np.maximum(w64.max(axis=1), 0)
    bits = spec.format.bits
    if not spec.symmetric:
        extent, qmax = hi - lo, 2**bits - 1
    else:
        extent = np.maximum(-lo, hi)
        qmax = 2 ** (bits - 1) - 1 if spec.format.family == "int" else spec.format.max_value
    s = q.scales[:, 0].astype(np.float64)
    nonzero = extent > 0
    normal = {"fp8": (2**-6, 448), "fp16": (2**-14, 65504)}.get(spec.scale_format)
    if normal:  # outside the normal range fp8 saturates and fp16 loses relative precision
        nonzero &= (extent / qmax >= normal[0]) & (extent / qmax <= normal[1])
    assert np.all(s[nonzero] * qmax >= extent[nonzero])
    assert np.all(s[nonzero] * qmax <= extent[nonzero] * 1.125)


# --- spec validation and sizes -------------------------------------------------------------------


def test_invalid_specs() -> None:
    with pytest.raises(ValueError):
        QuantSpec(WEIGHT_FORMATS["uint4"], "channel")  # symmetric uint
    with pytest.raises(ValueError):
        QuantSpec(WEIGHT_FORMATS["fp4_e2m1"], "channel", symmetric=False)
    with pytest.raises(ValueError):
        QuantSpec(WEIGHT_FORMATS["int4"], "group")
    with pytest.raises(ValueError):
        QuantSpec(WEIGHT_FORMATS["int4"], "channel", scale_format="bf16")  # type: ignore[arg-type]
    spec = QuantSpec(WEIGHT_FORMATS["int4"], "group", 32)
    with pytest.raises(ValueError):
        quantize(np.array([[np.nan]], np.float32), spec)
    with pytest.raises(ValueError):
        quantize(np.ones(4, np.float32), spec)
    with pytest.raises(ValueError):
        quantize(np.ones((2, 4), np.float32), spec, clip=0.0)


def test_nbytes() -> None:
    int4 = QuantSpec(WEIGHT_FORMATS["int4"], "group", 32, symmetric=False, scale_format="fp16")
    assert nbytes(int4, (64, 100)) == {
        "codes": 3200,
        "scales": 64 * 4 * 2,
        "zero_points": 128,
        "total": 3200 + 512 + 128,
    }
    int3 = QuantSpec(WEIGHT_FORMATS["int3"], "tensor")
    assert nbytes(int3, (3, 5)) == {"codes": 6, "scales": 4, "zero_points": 0, "total": 10}
    mx = QuantSpec(WEIGHT_FORMATS["fp4_e2m1"], "group", 32, scale_format="e8m0")
    assert nbytes(mx, (1, 64))["total"] == 32 + 2


# --- packing -------------------------------------------------------------------------------------


def test_pack_layout_by_hand() -> None:
    assert pack(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack(np.array([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack(np.array([1, 2, 3, 0, 3]), 2).tolist() == [0b00_11_10_01, 0b11]
    # 3-bit: word = 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 = 0x1F58D1, little-endian
    assert pack(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [0xD1, 0x58, 0x1F]
    assert pack(np.array([7]), 3).tolist() == [0x07, 0, 0]
    assert pack(np.array([[200, 3]]), 8).tolist() == [[200, 3]]
    with pytest.raises(ValueError):
        pack(np.array([16]), 4)


def test_pack_3bit_is_24bit_words() -> None:
    codes = np.random.default_rng(0).integers(0, 8, (5, 64))
    words = (codes.reshape(5, 8, 8) << (3 * np.arange(8))).sum(-1)
    expected = np.stack([words & 0xFF, words >> 8 & 0xFF, words >> 16], -1).reshape(5, 24)
    assert np.array_equal(pack(codes, 3), expected)


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    lead=st.lists(st.integers(1, 3), max_size=2),
    count=st.integers(0, 41),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_round_trip(bits, lead, count, seed) -> None:
    codes = np.random.default_rng(seed).integers(0, 2**bits, (*lead, count)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (*lead, packed_size(count, bits))
    assert np.array_equal(unpack(packed, bits, count), codes)


def test_pack_matches_matmulnbits_blocks() -> None:
    """Per-block packing of int4 codes as MatMulNBits reads B: [N, k_blocks, block / 2]."""
    codes = np.random.default_rng(0).integers(0, 16, (3, 64)).astype(np.uint8)
    b = pack(codes.reshape(3, 2, 32), 4)
    assert b.shape == (3, 2, 16)
    for n, k, i in itertools.product(range(3), range(2), range(16)):
        low, high = codes[n, 32 * k + 2 * i], codes[n, 32 * k + 2 * i + 1]
        assert b[n, k, i] == low | high << 4
