"""Low-rank error compensation and bias correction against closed forms and brute force.

The EoRA checks do not reuse the module's formula: the optimum is computed the way the paper
writes it (project with `Q diag(sqrt l)`, truncated SVD, map back with `diag(1/sqrt l) Q^T`), its
value is the sum of the squared discarded singular values, and random perturbations and the
gradient confirm that nothing nearby does better.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import weighted_error

from qspec.compiler.capture import Layer, float_matrix, unmatrix
from qspec.compiler.numerics import nbytes
from qspec.compiler.qmodel import FACTOR_SPEC, factor_bytes
from qspec.passes import lowrank
from qspec.passes.calibrate import group_rows
from qspec.passes.lowrank import (
    bias_correction,
    eora_correction,
    finetune,
    quantize_factor,
    store_factors,
    svd_correction,
)

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.tuples(
    st.integers(1, 12), st.integers(1, 12), st.integers(0, 14), st.integers(0, 2**16)
)


def correlated_inputs(rng: np.random.Generator, n: int, cols: int) -> np.ndarray:
    """Inputs with very unequal, correlated channels (what makes EoRA differ from SVD)."""
    scales = np.geomspace(0.05, 5.0, cols)
    mix = np.eye(cols) + rng.standard_normal((cols, cols)) / np.sqrt(cols)
    return (rng.standard_normal((n, cols)) * scales) @ mix


def problem(seed: int, rows: int = 24, cols: int = 16, n: int = 200):
    rng = np.random.default_rng(seed)
    error = rng.standard_normal((rows, cols))
    x = correlated_inputs(rng, n, cols)
    return error, x.T @ x, x


def truncated_svd(error: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(error, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def paper_eora(error: np.ndarray, h: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    """EoRA as written in the paper for positive definite H: (B A, optimal objective)."""
    lam, q = np.linalg.eigh(h)
    assert lam.min() > 0
    u, s, vt = np.linalg.svd(error @ q * np.sqrt(lam), full_matrices=False)
    ba = (u[:, :r] * s[:r]) @ vt[:r] @ (q / np.sqrt(lam)).T
    return ba, float(np.sum(s[r:] ** 2))


# --- plain SVD (LoRC) -----------------------------------------------------------------------------


@SETTINGS
@given(shapes)
def test_svd_is_the_truncated_svd(case):
    rows, cols, rank, seed = case
    error = np.random.default_rng(seed).standard_normal((rows, cols))
    b, a = svd_correction(error, rank)
    r = min(rank, rows, cols)
    assert b.shape == (rows, r) and a.shape == (r, cols)
    np.testing.assert_allclose(b @ a, truncated_svd(error, r), atol=1e-10)
    # balanced split: column i of B and row i of A have equal norms
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1), rtol=1e-9)


def test_svd_error_decreases_with_rank_and_is_exact_at_full_rank():
    error = np.random.default_rng(1).standard_normal((20, 9))
    residuals = [np.linalg.norm(error - np.matmul(*svd_correction(error, r))) for r in range(10)]
    assert all(b < a for a, b in itertools.pairwise(residuals[:10]))
    assert residuals[9] < 1e-12 and residuals[-1] == residuals[9]
    b, a = svd_correction(error, 50)
    assert b.shape == (20, 9)
    np.testing.assert_allclose(b @ a, error, atol=1e-12)


def test_dtype_and_degenerate_inputs():
    error = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    b, a = svd_correction(error, 2)
    assert b.dtype == a.dtype == np.float32
    b, a = svd_correction(np.zeros((5, 3)), 2)
    assert not b.any() and not a.any()
    b, a = svd_correction(error, 0)
    assert b.shape == (6, 0) and a.shape == (0, 4)
    with pytest.raises(ValueError):
        svd_correction(error, -1)
    with pytest.raises(ValueError):
        eora_correction(error, np.eye(3), 2)


# --- EoRA -----------------------------------------------------------------------------------------


@SETTINGS
@given(shapes)
def test_eora_matches_the_paper_and_its_closed_form_value(case):
    rows, cols, rank, seed = case
    rng = np.random.default_rng(seed)
    error = rng.standard_normal((rows, cols))
    x = correlated_inputs(rng, 3 * cols + 5, cols)
    h = x.T @ x + 1e-3 * np.eye(cols)  # positive definite, well above the damping floor
    r = min(rank, rows, cols)
    b, a = eora_correction(error, h, rank)
    ba, optimum = paper_eora(error, h, r)
    assert b.shape == (rows, r) and a.shape == (r, cols)
    np.testing.assert_allclose(b @ a, ba, atol=1e-8 * max(1.0, np.abs(ba).max()))
    scale = weighted_error(error, h, np.zeros((rows, 0)), np.zeros((0, cols)))
    assert abs(weighted_error(error, h, b, a) - optimum) <= 1e-9 * scale


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_eora_beats_svd_on_correlated_inputs(rank):
    error, h, x = problem(3)
    b, a = eora_correction(error, h, rank)
    bs, as_ = svd_correction(error, rank)
    eora, svd = weighted_error(error, h, b, a), weighted_error(error, h, bs, as_)
    assert eora < 0.98 * svd
    # the weighted objective is the output error on the calibration inputs
    np.testing.assert_allclose(eora, np.sum((x @ (error - b @ a).T) ** 2), rtol=1e-9)
    # and plain SVD wins on its own (unweighted) objective
    assert np.linalg.norm(error - bs @ as_) <= np.linalg.norm(error - b @ a)


def test_eora_no_nearby_rank_r_factors_do_better():
    error, h, _ = problem(4)
    rank = 4
    b, a = eora_correction(error, h, rank)
    best = weighted_error(error, h, b, a)
    rng = np.random.default_rng(5)
    for i in range(300):
        eps = 10.0 ** rng.uniform(-6, -1) * np.abs(b).max()
        db, da = rng.standard_normal(b.shape), rng.standard_normal(a.shape)
        assert weighted_error(error, h, b + eps * db, a + eps * da) >= best * (1 - 1e-12), i
    # first-order condition: the gradient in B and A vanishes at the solution
    tb = torch.tensor(b, requires_grad=True)
    ta = torch.tensor(a, requires_grad=True)
    d = torch.from_numpy(error) - tb @ ta
    torch.sum((d @ torch.from_numpy(h)) * d).backward()
    assert tb.grad.abs().max() < 1e-8 * best and ta.grad.abs().max() < 1e-8 * best


@pytest.mark.parametrize("damp", [1e-6, 1e-2, 0.0])
def test_eora_singular_h_is_finite_and_near_optimal(damp):
    rng = np.random.default_rng(6)
    rows, cols = 20, 16
    error = rng.standard_normal((rows, cols))
    x = correlated_inputs(rng, 6, cols)  # 6 samples: H has rank 6 of 16
    x[:, 3] = 0.0  # a dead input
    h = x.T @ x
    lam, q = np.linalg.eigh(h)
    assert lam.min() < 1e-9 * lam.max()  # singular, with rounding-negative eigenvalues likely
    s = np.linalg.svd(error @ q * np.sqrt(np.maximum(lam, 0)), compute_uv=False)
    floor = damp * np.maximum(lam, 0).mean()
    tol = 1e-9 * lam.max() * np.sum(error**2)
    for rank in (5, 6):  # 6: all that H sees, so the optimum is 0
        b, a = eora_correction(error, h, rank, damp=damp)
        assert np.isfinite(b).all() and np.isfinite(a).all()
        optimum = float(np.sum(s[rank:] ** 2))
        got = weighted_error(error, h, b, a)
        assert optimum - tol <= got <= optimum + floor * np.sum(error**2) + tol


def test_eora_degenerate_h_falls_back_to_svd():
    error = np.random.default_rng(7).standard_normal((8, 5))
    for h in (np.zeros((5, 5)), -np.eye(5)):
        b, a = eora_correction(error, h, 2)
        np.testing.assert_allclose(b @ a, truncated_svd(error, 2), atol=1e-10)
    # H = c I: the weighting is uniform, EoRA is plain SVD
    b, a = eora_correction(error, 7.0 * np.eye(5), 3)
    np.testing.assert_allclose(b @ a, truncated_svd(error, 3), atol=1e-10)


# --- fine-tune ------------------------------------------------------------------------------------


def finetune_problem(seed: int = 8):
    rng = np.random.default_rng(seed)
    rows, cols = 24, 16
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    wc = (np.round(w * 2) / 2).astype(np.float32)
    x = correlated_inputs(rng, 240, cols).astype(np.float32)
    batches = [x[i : i + 60] for i in range(0, 240, 60)]
    return w, wc, batches, x


def objective(b, a, w, wc, x) -> float:
    x = x.astype(np.float64)
    ba = b.astype(np.float64) @ a.astype(np.float64)
    return float(np.mean(np.sum((x @ (wc + ba).T - x @ w.T) ** 2, axis=1)))


def test_finetune_improves_svd_factors_and_never_hurts_eora():
    w, wc, batches, x = finetune_problem()
    b, a = svd_correction(w - wc, 3)
    start = objective(b, a, w, wc, x)
    fb, fa = finetune(b, a, w, wc, batches, steps=200, lr=1e-2)
    assert fb.dtype == np.float32 and fb.shape == b.shape and fa.shape == a.shape
    tuned = objective(fb, fa, w, wc, x)
    assert tuned < 0.9 * start
    # EoRA is the optimum of this very objective: fine-tuning keeps it (or ties it)
    eb, ea = eora_correction(w - wc, x.astype(np.float64).T @ x, 3)
    optimum = objective(eb, ea, w, wc, x)
    assert optimum <= tuned * (1 + 1e-6)
    gb, ga = finetune(eb, ea, w, wc, batches, steps=50, lr=1e-2)
    assert objective(gb, ga, w, wc, x) <= optimum * (1 + 1e-6)


def test_finetune_gradient_is_the_objective_gradient():
    rng = np.random.default_rng(12)
    e, b, a = rng.standard_normal((7, 5)), rng.standard_normal((7, 2)), rng.standard_normal((2, 5))
    x = correlated_inputs(rng, 30, 5)
    value, (gb, ga) = lowrank._layer_objective(e, x.T @ x)(b, a)
    tb, ta = torch.tensor(b, requires_grad=True), torch.tensor(a, requires_grad=True)
    loss = torch.sum((torch.from_numpy(x) @ (tb @ ta - torch.from_numpy(e)).T) ** 2)
    loss.backward()
    np.testing.assert_allclose(value, float(loss.detach()), rtol=1e-10)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ga, ta.grad.numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lr", [1e-3, 1.0, 100.0])
def test_finetune_never_worse_even_when_adam_diverges(lr):
    w, wc, batches, x = finetune_problem(9)
    b, a = svd_correction(w - wc, 2)
    fb, fa = finetune(b, a, w, wc, batches, steps=30, lr=lr)
    assert np.isfinite(fb).all() and np.isfinite(fa).all()
    assert objective(fb, fa, w, wc, x) <= objective(b, a, w, wc, x) * (1 + 1e-6)


def test_finetune_is_deterministic_and_seeded_from_zero():
    w, wc, batches, _ = finetune_problem(10)
    b, a = svd_correction(w - wc, 2)
    one = finetune(b, a, w, wc, batches, steps=20, seed=0)
    two = finetune(b, a, w, wc, batches, steps=20, seed=1)  # seed unused: factors are not zero
    assert all(np.array_equal(p, q) for p, q in zip(one, two, strict=True))
    zb, za = np.zeros_like(b), np.zeros_like(a)
    s0 = finetune(zb, za, w, wc, batches, steps=20, lr=1e-2, seed=0)
    s0_again = finetune(zb, za, w, wc, batches, steps=20, lr=1e-2, seed=0)
    s1 = finetune(zb, za, w, wc, batches, steps=20, lr=1e-2, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(s0, s0_again, strict=True))
    assert not np.array_equal(s0[1], s1[1])
    assert np.any(s0[0] @ s0[1])  # left the saddle at zero


def test_finetune_respects_the_step_bound(monkeypatch):
    w, wc, batches, _ = finetune_problem(11)
    b, a = svd_correction(w - wc, 2)
    counted = []
    update = lowrank._adam_update

    def counting(*args):
        counted.append(1)
        return update(*args)

    monkeypatch.setattr(lowrank, "_adam_update", counting)
    for steps in (0, 1, 17):
        counted.clear()
        fb, fa = finetune(b, a, w, wc, batches, steps=steps)
        assert len(counted) == steps
    fb, fa = finetune(b, a, w, wc, batches, steps=0)
    assert np.array_equal(fb, b) and np.array_equal(fa, a) and fb is not b
    with pytest.raises(ValueError):
        finetune(b, a, w, wc, batches, steps=-1)
    with pytest.raises(ValueError):
        finetune(b, a, w, wc, [], steps=1)


# --- storage --------------------------------------------------------------------------------------


@SETTINGS
@given(shapes)
def test_store_factors_round_trips(case):
    rows, cols, rank, seed = case
    rng = np.random.default_rng(seed)
    r = min(rank, rows, cols)
    b = (rng.standard_normal((rows, r)) * rng.uniform(0.01, 10, (rows, 1))).astype(np.float32)
    a = (rng.standard_normal((r, cols)) * rng.uniform(0.01, 10, (r, 1))).astype(np.float32)
    hb, ha = store_factors(b, a, "fp16")
    assert hb.dtype == ha.dtype == np.float16
    assert np.array_equal(hb, b.astype(np.float16)) and np.array_equal(ha, a.astype(np.float16))
    again = store_factors(hb.astype(np.float32), ha.astype(np.float32), "fp16")
    assert np.array_equal(again[0], hb) and np.array_equal(again[1], ha)
    qb, qa = store_factors(b, a, "int8")
    assert qb.dtype == qa.dtype == np.float32 and qb.shape == b.shape and qa.shape == a.shape
    for m, q in ((b, qb), (a, qa)):
        step = np.abs(m).max(axis=1, keepdims=True, initial=0) / 127
        assert np.all(np.abs(q - m) <= step / 2 * (1 + 1e-6) + 1e-30)
    assert factor_bytes(rows, cols, r, "fp16") == hb.nbytes + ha.nbytes
    if r:
        stored = [quantize_factor(m) for m in (b, a)]
        assert factor_bytes(rows, cols, r, "int8") == sum(
            q.codes.nbytes + q.scales.nbytes for q in stored
        )
        assert factor_bytes(rows, cols, r, "int8") == sum(
            nbytes(FACTOR_SPEC, m.shape)["total"] for m in (b, a)
        )
        np.testing.assert_array_equal(stored[0].dequantize(), qb)


def test_factor_bytes_and_format_errors():
    assert factor_bytes(1536, 384, 32, "fp16") == 2 * 32 * (1536 + 384)
    assert factor_bytes(1536, 384, 32, "int8") == 32 * (1536 + 384) + 4 * (1536 + 32)
    with pytest.raises(ValueError):
        factor_bytes(4, 4, 1, "fp8")
    with pytest.raises(ValueError):
        store_factors(np.ones((2, 1)), np.ones((1, 2)), "int4")
    with pytest.raises(ValueError):
        store_factors(np.full((2, 1), 1e6), np.ones((1, 2)), "fp16")


# --- bias correction ------------------------------------------------------------------------------


@SETTINGS
@given(shapes)
def test_bias_correction_restores_the_mean_output(case):
    rows, cols, _, seed = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols))
    wc = np.round(w * 2) / 2
    bias = rng.standard_normal(rows)
    mu = rng.normal(3.0, 2.0, cols)
    noise = rng.standard_normal((64, cols))
    x = mu + noise - noise.mean(axis=0)  # sample mean exactly mu
    shift = bias_correction(w, wc, mu)
    assert shift.shape == (rows,)
    float_mean = (x @ w.T + bias).mean(axis=0)
    corrected = (x @ wc.T + bias + shift).mean(axis=0)
    np.testing.assert_allclose(corrected, float_mean, atol=1e-9 * (1 + np.abs(float_mean).max()))
    uncorrected = (x @ wc.T + bias).mean(axis=0)
    assert np.abs(uncorrected - float_mean).max() >= np.abs(corrected - float_mean).max()


@pytest.mark.parametrize(("channels", "groups"), [(8, 4), (6, 6)])
def test_bias_correction_of_a_grouped_conv_restores_each_channels_mean(channels, groups):
    """Each output channel reads only its group's input: its shift uses that group's mean
    patch (depthwise convolutions, one channel per group, are where this matters most)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1, groups=groups)
    layer = Layer("c", "conv2d", tuple(conv.weight.shape), conv.weight.numel(), 0, groups)
    x = torch.relu(torch.randn(5, channels, 7, 6)) + 0.5  # a nonzero mean, as after a ReLU
    mean = group_rows(layer, conv, x).double().mean(0).numpy()
    w = float_matrix(layer, conv).astype(np.float64)
    compressed = np.round(w * 4) / 4
    shift = bias_correction(w, compressed, mean)
    corrected = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1, groups=groups)
    with torch.no_grad():
        corrected.weight.copy_(unmatrix(layer, torch.from_numpy(compressed).float()))
        corrected.bias.copy_(conv.bias + torch.from_numpy(shift).float())
        expected, got = conv(x).mean((0, 2, 3)), corrected(x).mean((0, 2, 3))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
