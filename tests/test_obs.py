"""The OBS solver (GPTQ, SparseGPT, both): lower H-weighted error than RTN and magnitude pruning,
valid codes and masks, and the edge cases (dead inputs, failing Cholesky, nothing to do).

Layers are small random weights with H = X^T X / n from correlated inputs X = Z A (a random
mixing A and per-channel magnitudes, like real activations).
"""

from __future__ import annotations

import numpy as np
import pytest

from qspec.compiler.numerics import Quantized, QuantSpec, decode, quantize
from qspec.dsl.formats import WEIGHT_FORMATS
from qspec.passes import obs
from qspec.passes.obs import OBSResult, solve

F = WEIGHT_FORMATS


def layer(rows: int = 64, cols: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(W float32 [rows, cols], H float64 [cols, cols]) from correlated inputs."""
    rng = np.random.default_rng(seed)
    n = 4 * cols
    A = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    X = rng.standard_normal((n, cols)) @ A * np.exp(0.5 * rng.standard_normal(cols))
    W = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
    return W, X.T @ X / n


def error(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """trace((W - Q) H (W - Q)^T)."""
    D = W.astype(np.float64) - Q
    return float(np.sum((D @ H) * D))


def check_codes(q: Quantized, weight: np.ndarray) -> None:
    """Codes in range, never a NaN/inf or excluded code, and the reference for `weight`."""
    fmt = q.spec.format
    assert q.codes.dtype == np.uint8 and int(q.codes.max()) < 1 << fmt.bits
    assert np.isfinite(decode(q.codes, fmt)).all()
    if fmt.family == "int" and q.spec.symmetric:
        assert q.codes.min() >= 1  # -2^(b-1) is outside the symmetric grid
    assert weight.dtype == np.float32
    assert np.array_equal(q.dequantize(), weight)


def magnitude_mask(W: np.ndarray, sparsity: tuple[int, int] | float, block: int = 128):
    """Keep the largest |w| per row: n of every m columns, or 1 - r of every block."""
    rows, cols = W.shape
    if isinstance(sparsity, tuple):
        n, m = sparsity
        order = np.argsort(np.abs(W).reshape(rows, cols // m, m), axis=-1)
        mask = np.ones((rows, cols // m, m), bool)
        np.put_along_axis(mask, order[..., : m - n], False, axis=-1)
        return mask.reshape(rows, cols)
    mask = np.ones_like(W, bool)
    for i1 in range(0, cols, block):
        part = np.abs(W[:, i1 : i1 + block])
        k = round(sparsity * part.shape[1])
        order = np.argsort(part, axis=1)
        np.put_along_axis(mask[:, i1 : i1 + block], order[:, :k], False, axis=1)
    return mask


# --- GPTQ ----------------------------------------------------------------------------------------

GPTQ_SPECS = {
    "int4-g32-asym": (QuantSpec(F["int4"], "group", 32, symmetric=False), 0.8),
    "int3-g32": (QuantSpec(F["int3"], "group", 32), 0.8),
    "int8-channel": (QuantSpec(F["int8"], "channel"), 1.0),
    "nf4-g32": (QuantSpec(F["nf4"], "group", 32), 0.8),
    "fp4_e2m1-g32": (QuantSpec(F["fp4_e2m1"], "group", 32), 0.8),
}


@pytest.mark.parametrize("actorder", [False, True], ids=["natural", "actorder"])
@pytest.mark.parametrize("name", list(GPTQ_SPECS))
def test_gptq_beats_rtn(name: str, actorder: bool) -> None:
    spec, margin = GPTQ_SPECS[name]
    W, H = layer()
    result = solve(W, H, spec=spec, sparsity=None, actorder=actorder)
    assert result.mask is None and result.warnings == []
    assert result.quantized is not None
    check_codes(result.quantized, result.weight)
    rtn = quantize(W, spec)
    assert error(W, result.weight, H) < margin * error(W, rtn.dequantize(), H)
    # static groups: the scales are RTN's, in storage order, whatever the visiting order
    assert np.array_equal(result.quantized.scales, rtn.scales)
    if rtn.zero_points is not None:
        assert np.array_equal(result.quantized.zero_points, rtn.zero_points)


def spec_for(fmt_name: str) -> QuantSpec:
    fmt = F[fmt_name]
    return QuantSpec(fmt, "group", 16, symmetric=fmt.family != "uint")


@pytest.mark.parametrize("fmt_name", list(F))
def test_every_format(fmt_name: str) -> None:
    W, H = layer(16, 64, seed=1)
    spec = spec_for(fmt_name)
    result = solve(W, H, spec=spec, sparsity=None, actorder=True, blocksize=24)
    check_codes(result.quantized, result.weight)
    assert result.warnings == []
    assert error(W, result.weight, H) < error(W, quantize(W, spec).dequantize(), H)


def test_rtn_kept_when_it_is_better(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard: with the error measure negated, RTN looks better and is returned."""
    W, H = layer(16, 64)
    spec = QuantSpec(F["int4"], "group", 32)
    measure = obs._error
    monkeypatch.setattr(obs, "_error", lambda W, Q, H: -measure(W, Q, H))
    result = solve(W, H, spec=spec, sparsity=None)
    assert any("kept RTN" in w for w in result.warnings)
    assert np.array_equal(result.quantized.codes, quantize(W, spec).codes)
    assert np.array_equal(result.weight, quantize(W, spec).dequantize())


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(F["int4"], "tensor"),
        QuantSpec(F["fp4_e2m1"], "group", 32, scale_format="e8m0"),
        QuantSpec(F["fp8_e4m3"], "channel", scale_format="fp16"),
        QuantSpec(F["uint4"], "group", 48, symmetric=False),  # a partial last group
    ],
    ids=["int4-tensor", "fp4-e8m0", "fp8-fp16", "uint4-g48"],
)
def test_granularities_and_scale_formats(spec: QuantSpec) -> None:
    W, H = layer(32, 112, seed=2)
    result = solve(W, H, spec=spec, sparsity=None, actorder=True, blocksize=40)
    check_codes(result.quantized, result.weight)
    assert error(W, result.weight, H) < error(W, quantize(W, spec).dequantize(), H)


def test_dead_inputs_keep_their_rounded_weights() -> None:
    """An input always zero on the calibration data costs nothing there whatever its weight:
    quantized alone, its weights are rounded to nearest, not zeroed, since other data may use
    them; pruning takes them first (lowest saliency)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((256, 64)) @ (rng.standard_normal((64, 64)) / 8 + np.eye(64))
    X[:, [5, 40]] = 0
    H = X.T @ X
    W = rng.normal(0, 0.05, (32, 64)).astype(np.float32)
    spec = QuantSpec(F["int4"], "group", 32, symmetric=False)
    nearest = quantize(W, spec).dequantize()[:, [5, 40]]
    for kwargs, kept in (
        ({"spec": spec, "sparsity": None, "actorder": True}, nearest),
        ({"spec": None, "sparsity": (2, 4)}, W[:, [5, 40]]),
        ({"spec": spec, "sparsity": 0.5}, nearest),
    ):
        result = solve(W, H, **kwargs)
        assert np.isfinite(result.weight).all()
        dead = result.weight[:, [5, 40]]
        assert ((dead == kept) | (dead == 0)).all()
        assert (dead == kept).all() or kwargs["sparsity"] is not None
        assert any("always zero" in w for w in result.warnings)


def test_damping_grows_when_cholesky_fails() -> None:
    """H with a tiny negative eigenvalue (a rank-deficient X^T X after rounding)."""
    rng = np.random.default_rng(4)
    V = np.linalg.qr(rng.standard_normal((48, 48)))[0]
    eig = np.concatenate([rng.uniform(0.5, 2, 24), np.full(24, -1e-9)])
    H = (V * eig) @ V.T
    W = rng.normal(0, 0.05, (16, 48)).astype(np.float32)
    spec = QuantSpec(F["int4"], "group", 16)
    result = solve(W, H, spec=spec, sparsity=None, percdamp=1e-12)
    mean = float(np.mean(np.diag(H)))
    assert result.damp > 1e-9 * mean
    assert any("damping raised" in w for w in result.warnings)
    assert np.isfinite(result.weight).all()
    check_codes(result.quantized, result.weight)


def test_hopeless_h_falls_back_to_rtn() -> None:
    rng = np.random.default_rng(5)
    V = np.linalg.qr(rng.standard_normal((32, 32)))[0]
    H = (V * np.r_[np.ones(31), -0.5]) @ V.T  # not PSD: no damping we try (<= 0.01 mean) helps
    W = rng.normal(0, 0.05, (8, 32)).astype(np.float32)
    spec = QuantSpec(F["int4"], "group", 16)
    result = solve(W, H, spec=spec, sparsity=None, percdamp=1e-8)
    assert any("used RTN" in w for w in result.warnings)
    assert np.array_equal(result.weight, quantize(W, spec).dequantize())


# --- SparseGPT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_n_of_m(n: int, m: int) -> None:
    W, H = layer(48, 96)
    result = solve(W, H, spec=None, sparsity=(n, m), blocksize=30)  # rounded to a multiple of m
    assert result.quantized is None and result.mask is not None
    rows, cols = W.shape
    kept = result.mask.reshape(rows, cols // m, m).sum(axis=-1)
    nonzero = (result.weight != 0).reshape(rows, cols // m, m).sum(axis=-1)
    assert (kept == n).all() and (nonzero <= n).all()
    assert (result.weight[~result.mask] == 0).all()
    magnitude = W * magnitude_mask(W, (n, m))
    assert error(W, result.weight, H) < 0.9 * error(W, magnitude, H)


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_unstructured(ratio: float) -> None:
    W, H = layer(32, 200)
    result = solve(W, H, spec=None, sparsity=ratio, blocksize=64)
    assert result.mask is not None
    for i1 in range(0, 200, 64):  # blocks of 64, 64, 64 and 8 columns
        part = result.mask[:, i1 : i1 + 64]
        pruned = (~part).sum(axis=1)
        assert (np.abs(pruned - ratio * part.shape[1]) <= 0.5).all()
    assert (result.weight[~result.mask] == 0).all()
    magnitude = W * magnitude_mask(W, ratio, block=64)
    assert error(W, result.weight, H) < 0.9 * error(W, magnitude, H)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(F["int4"], "group", 32, symmetric=False),
        QuantSpec(F["uint8"], "channel", symmetric=False),
        QuantSpec(F["fp4_e2m1"], "group", 16),
        QuantSpec(F["nf4"], "group", 32),
    ],
    ids=["int4-asym", "uint8-asym", "fp4", "nf4"],
)
@pytest.mark.parametrize("sparsity", [(2, 4), 0.5], ids=["2:4", "50%"])
def test_joint_prune_and_quantize(spec: QuantSpec, sparsity: tuple[int, int] | float) -> None:
    W, H = layer(32, 128, seed=6)
    result = solve(W, H, spec=spec, sparsity=sparsity)
    assert result.quantized is not None and result.mask is not None
    check_codes(result.quantized, result.weight)
    assert (result.weight[~result.mask] == 0).all()
    assert (~result.mask).mean() == 0.5
    # better than magnitude pruning followed by round-to-nearest
    baseline = quantize(W * magnitude_mask(W, sparsity), spec).dequantize()
    assert error(W, result.weight, H) < error(W, baseline, H)


def test_actorder_ignored_for_n_of_m() -> None:
    W, H = layer(16, 64)
    result = solve(W, H, spec=None, sparsity=(2, 4), actorder=True)
    assert any("actorder ignored" in w for w in result.warnings)
    assert (result.mask.reshape(16, 16, 4).sum(axis=-1) == 2).all()


# --- determinism and the trivial cases -----------------------------------------------------------


def result_bytes(result: OBSResult) -> list[bytes]:
    parts = [result.weight.tobytes()]
    if result.mask is not None:
        parts.append(result.mask.tobytes())
    if result.quantized is not None:
        q = result.quantized
        parts += [q.codes.tobytes(), q.scales.tobytes()]
        parts += [] if q.zero_points is None else [q.zero_points.tobytes()]
    return parts


@pytest.mark.parametrize("sparsity", [None, (2, 4), 0.5])
def test_deterministic(sparsity: tuple[int, int] | float | None) -> None:
    W, H = layer(64, 128, seed=7)
    spec = QuantSpec(F["int4"], "group", 32, symmetric=False)
    first = solve(W, H, spec=spec, sparsity=sparsity, actorder=sparsity is None)
    second = solve(W.copy(), H.copy(), spec=spec, sparsity=sparsity, actorder=sparsity is None)
    assert result_bytes(first) == result_bytes(second)


@pytest.mark.parametrize("sparsity", [None, 0.0, (4, 4)])
def test_nothing_to_do_changes_nothing(sparsity: tuple[int, int] | float | None) -> None:
    W, H = layer(16, 64)
    H[3, :] = H[:, 3] = 0  # even a dead input is left alone
    result = solve(W, H, spec=None, sparsity=sparsity)
    assert result.weight.dtype == np.float32 and np.array_equal(result.weight, W)
    assert result.weight is not W and result.quantized is None and result.warnings == []
    assert (result.mask is None) == (sparsity is None)
    assert result.mask is None or result.mask.all()


def test_bad_arguments() -> None:
    W, H = layer(8, 32)
    with pytest.raises(ValueError):
        solve(W, H, spec=None, sparsity=(2, 3))  # 3 does not divide 32
    with pytest.raises(ValueError):
        solve(W, H, spec=None, sparsity=1.0)
    with pytest.raises(ValueError):
        solve(W, H[:16, :16], spec=None, sparsity=0.5)
