"""The Optimal Brain Surgeon weight solver that GPTQ and SparseGPT share.

GPTQ (Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") and SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot") both minimise a layer's output error

    ||X W^T - X Q^T||^2 = trace((W - Q) H (W - Q)^T),   H = X^T X,   W: [rows, cols], X: [n, cols]

one input column at a time. Column j is rounded (GPTQ) or pruned (SparseGPT) or both, and the
error it leaves is spread over the columns not yet visited by the OBS update

    Err = (W[:, j] - Q[:, j]) / U[j, j],      W[:, j:] -= Err U[j, j:]

where U is the upper Cholesky factor of H^-1 (U^T U = H^-1; the reference code calls it Hinv):
row j of U, times U[j, j], is row j of the inverse Hessian of the columns j.. that remain after
eliminating 0..j-1, so one factorisation serves every step.
Columns run in blocks of `blocksize`; columns beyond the block get one batched update per block.

Choices, beyond the papers' reference code:
- Damping: `percdamp * mean(diag(H))` on the diagonal. If H + damp I (or its inverse) does not
  factorise, damp grows tenfold, up to `MAX_RETRIES` times, with a warning; if it never
  factorises, U = I, which is round-to-nearest / magnitude pruning, again with a warning.
- Dead inputs (H_ii == 0, an input that is always zero on the calibration data): H_ii = 1, and
  their weights are rounded to nearest, not zeroed as in the reference code: they cost nothing
  on the calibration data either way, and an input dead on a few calibration images is alive
  on others (zeroed, EfficientNet-Lite0's last project convs lost 25% of their output).
- Static groups: block scales and zero points are fitted once, with `fit_scales`, on the whole
  (unpermuted) W before the loop, with and without act-order. Groups stay
  contiguous in storage, and codes/scales are returned in the original column order.
- Act-order: columns are visited in decreasing diag(H). It applies to quantization and
  unstructured pruning; an N:M pattern is defined on consecutive storage columns, so there it is
  ignored (with a warning).
- Masks: N:M `(n, m)` keeps n of every m consecutive columns per row, chosen at the start of each
  m-group by the OBS saliency w^2 / U_jj^2; a ratio r prunes, at the start of each block and in
  every row, the round(r * block) columns of lowest saliency (the reference picks one threshold
  over the whole block; per row keeps every output channel equally sparse).
- Joint mode (SparseGPT section 3.5): in the same column loop a pruned weight is set to 0 and
  the column is then rounded; 0 is on every grid (asymmetric ints: the zero point), so pruned
  weights are exactly 0 in the codes.
- GPTQ alone falls back to round-to-nearest (with a warning) in the rare case that RTN has the
  lower H-weighted error, so the result is never worse than RTN on the calibration data.
- The solver works in float64 numpy; rounding goes through `quantize_values`, and the returned
  weight is `quantized.dequantize()`, so the codes and scales are the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from qspec.compiler.numerics import (
    Quantized,
    QuantSpec,
    dequantize_values,
    fit_scales,
    quantize_values,
)

MAX_RETRIES = 6  # tenfold damping increases before giving up on the Cholesky factorisation


@dataclass
class OBSResult:
    quantized: Quantized | None  # codes/scales/zero points (None when only pruning)
    weight: np.ndarray  # float32 [rows, cols]: the final (dequantized, masked) weight
    mask: np.ndarray | None  # bool [rows, cols], True = kept (None when not pruning)
    damp: float  # the damping finally used (after Cholesky retries)
    warnings: list[str] = field(default_factory=list)


def solve(
    W: np.ndarray,
    H: np.ndarray,
    *,
    spec: QuantSpec | None,
    sparsity: tuple[int, int] | float | None,
    percdamp: float = 0.01,
    blocksize: int = 128,
    actorder: bool = False,
    clip: float | np.ndarray = 1.0,
    keep: np.ndarray | None = None,
) -> OBSResult:
    """Quantize (GPTQ), prune (SparseGPT) or both, minimising trace((W - Q) H (W - Q)^T).

    W: float32 [rows, cols], rows = outputs, cols = the reduction dimension. H: [cols, cols],
    X^T X (summed or averaged) of the layer's inputs. `sparsity`: `(n, m)` keeps n of every m
    consecutive columns in each row; a float in [0, 1) prunes that fraction; None does not prune.
    `clip`: per-block range ratios for the static scales (from `search clip`). `keep`: a mask
    chosen beforehand (magnitude, Wanda) that GPTQ must respect: its zeros stay zero while their
    error is spread over the kept weights.
    """
    W0 = np.asarray(W, dtype=np.float32)
    H0 = np.asarray(H, dtype=np.float64)
    rows, cols = _check(W0, H0, percdamp, blocksize)
    n, m, ratio = _pattern(sparsity, cols)
    prunes = (m is not None and n < m) or (ratio is not None and ratio > 0) or keep is not None
    if spec is None and not prunes:  # nothing to do: W unchanged
        mask = None if sparsity is None else np.ones((rows, cols), bool)
        return OBSResult(None, W0.copy(), mask, 0.0, [])

    warnings: list[str] = []
    W = W0.astype(np.float64)
    H = (H0 + H0.T) / 2
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    if dead.any():
        count = int(dead.sum())
        warnings.append(f"{count} inputs always zero on the calibration data: rounded to nearest")

    if spec is not None:  # static groups, fitted on the unpermuted weight
        scales, zeros = fit_scales(W.astype(np.float32), spec, clip)
    if actorder and m is not None:
        warnings.append("actorder ignored: an N:M pattern runs over consecutive columns")
        actorder = False
    perm = np.argsort(-np.diag(H), kind="stable") if actorder else np.arange(cols)
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    Hinv, damp = _inverse_cholesky(H, percdamp, warnings)

    if spec is not None:  # per-column scales/zero points, in visiting order
        group = perm // spec.block_size(cols)
        S = scales[:, group]
        Z = None if zeros is None else zeros[:, group]
        codes = np.zeros((rows, cols), np.uint8)
    if m is not None:
        blocksize = max(m, blocksize // m * m)  # m-groups never straddle blocks
    Q = np.zeros_like(W)
    mask = np.ones((rows, cols), bool) if keep is None else keep[:, perm].copy()

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = np.diag(Hinv1)
        mask1 = mask[:, i1:i2]
        if ratio is not None:  # adaptive mask: lowest OBS saliency per row in this block
            k = round(ratio * count)
            order = np.argsort(W1**2 / d**2, axis=1, kind="stable")
            np.put_along_axis(mask1, order[:, :k], False, axis=1)
        for i in range(count):
            j = i1 + i
            if m is not None and i % m == 0:
                saliency = W1[:, i : i + m] ** 2 / d[i : i + m] ** 2
                order = np.argsort(saliency, axis=1, kind="stable")
                np.put_along_axis(mask1[:, i : i + m], order[:, : m - n], False, axis=1)
            w = W1[:, i]
            q = np.where(mask1[:, i], w, 0.0)
            if spec is not None:
                z = None if Z is None else Z[:, j]
                codes[:, j] = quantize_values(q.astype(np.float32), S[:, j], spec, z)
                q = dequantize_values(codes[:, j], S[:, j], spec, z)
            Q[:, j] = q
            Err1[:, i] = (w - q) / d[i]
            W1[:, i:] -= np.outer(Err1[:, i], Hinv1[i, i:])
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inverse = np.argsort(perm)
    mask = mask[:, inverse] if sparsity is not None or keep is not None else None
    if spec is None:
        return OBSResult(None, Q[:, inverse].astype(np.float32), mask, damp, warnings)

    quantized = Quantized(codes[:, inverse], scales, zeros, spec)
    if not prunes:  # GPTQ alone: never worse than RTN with the same scales
        rtn = _rtn(W0 * ~dead, scales, zeros, spec)
        if _error(W0, rtn.dequantize(), H0) < _error(W0, quantized.dequantize(), H0):
            warnings.append("GPTQ had a higher H-weighted error than RTN: kept RTN")
            quantized = rtn
    return OBSResult(quantized, quantized.dequantize(), mask, damp, warnings)


def _inverse_cholesky(
    H: np.ndarray, percdamp: float, warnings: list[str]
) -> tuple[np.ndarray, float]:
    """(U, damp): U upper triangular with U^T U = (H + damp I)^-1, damp grown until it exists.

    With J the reversal permutation and J (H + damp I) J = R R^T (R lower), U = J R^-1 J: one
    Cholesky factorisation and one triangular inverse instead of the reference's two and an
    inverse. Same U, up to rounding.
    """
    mean = float(np.mean(np.diag(H)))
    damp = percdamp * mean
    for attempt in range(MAX_RETRIES + 1):
        try:
            R = scipy.linalg.cholesky((H + damp * np.eye(len(H)))[::-1, ::-1], lower=True)
            Rinv, info = scipy.linalg.lapack.dtrtri(R, lower=1)
            if info == 0 and np.isfinite(Rinv).all():
                if attempt:
                    warnings.append(f"H not positive definite: damping raised to {damp:.3g}")
                return np.ascontiguousarray(Rinv[::-1, ::-1]), damp
        except np.linalg.LinAlgError:
            pass
        damp = damp * 10 if damp > 0 else 1e-6 * mean
    warnings.append(
        f"H not positive definite even with damping {damp / 10:.3g}: used RTN"
        " (U = I: round-to-nearest, magnitude pruning)"
    )
    return np.eye(len(H)), damp / 10


def _pattern(sparsity: tuple[int, int] | float | None, cols: int):
    """(n, m, ratio) from the `sparsity` argument, validated."""
    if sparsity is None:
        return None, None, None
    if isinstance(sparsity, tuple | list):
        n, m = sparsity
        if not 0 < n <= m or cols % m:
            raise ValueError(f"bad N:M pattern {n}:{m} for {cols} columns")
        return n, m, None
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity ratio must be in [0, 1), not {sparsity}")
    return None, None, float(sparsity)


def _check(W: np.ndarray, H: np.ndarray, percdamp: float, blocksize: int) -> tuple[int, int]:
    if W.ndim != 2 or 0 in W.shape or not np.isfinite(W).all():
        raise ValueError(f"W must be a finite, non-empty 2-D matrix, not shape {W.shape}")
    cols = W.shape[1]
    if H.shape != (cols, cols) or not np.isfinite(H).all() or (np.diag(H) < 0).any():
        raise ValueError(f"H must be a finite PSD [{cols}, {cols}] matrix (shape {H.shape})")
    if percdamp < 0 or blocksize < 1:
        raise ValueError("percdamp must be >= 0 and blocksize >= 1")
    return W.shape


def _rtn(W: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, spec: QuantSpec) -> Quantized:
    """Round-to-nearest onto given (static) scales."""
    block, cols = spec.block_size(W.shape[1]), W.shape[1]
    group = np.arange(cols) // block
    z = None if zeros is None else zeros[:, group]
    return Quantized(quantize_values(W, scales[:, group], spec, z), scales, zeros, spec)


def _error(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """trace((W - Q) H (W - Q)^T)."""
    D = W.astype(np.float64) - Q
    return float(np.sum((D @ H) * D))


def output_error(delta: np.ndarray, hessian: np.ndarray | None) -> float:
    """trace(ΔW H ΔWᵀ): the layer's squared output error on the calibration inputs."""
    if hessian is None:
        return float((delta * delta).sum())
    return float(((delta @ hessian) * delta).sum())
