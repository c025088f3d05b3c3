"""Error compensation: low-rank residual paths and bias correction for a compressed layer.

Shapes. A layer computes `y = x W^T (+ b)` with `W` `[rows, cols]` (rows = outputs, cols = the
reduction dimension) and inputs `X` `[n, cols]`. Compression leaves the error
`E = W - W_compressed`. A correction of rank `r` is a pair `B` `[rows, r]`, `A` `[r, cols]` added
as a branch `y += (x A^T) B^T` (MatMul by `A^T`, then by `B^T`), so the layer computes with
`W_compressed + B A`.

- `svd_correction`: the best rank-r `B A` in Frobenius norm, `min ||E - B A||_F` (LoRC, Yao et
  al. 2023, "ZeroQuant-V2"): the truncated SVD of `E` (Eckart-Young).
- `eora_correction`: the best rank-r `B A` on the layer's outputs, `min ||(E - B A) X^T||_F^2 =
  tr((E - B A) H (E - B A)^T)` with `H = X^T X` (EoRA, Liu et al. 2024, "Training-free
  Compensation for Compressed LLM with Eigenspace Low-Rank Approximation").
- `finetune`: a short Adam fine-tune of `B, A` on calibration inputs (LoRA error correction as in
  INT2.1, Chai et al. 2023), keeping the best iterate.
- `bias_correction`: the bias shift `(W - W_compressed) E[x]` that removes the expected output
  error (Nagel et al. 2019, "Data-Free Quantization", the data-driven variant).
- `store_factors` / `quantize_factor`: factors stored as fp16, or int8 with one fp32 scale per
  row (`compiler.qmodel.FACTOR_SPEC`; their bytes: `compiler.qmodel.factor_bytes`).

All linear algebra runs in float64; factors come back in the error's float dtype (float32 for a
float32 error). A requested rank above `min(rows, cols)` is clipped to it (the correction is then
exact), so the returned `r = B.shape[1]` may be smaller than asked: count bytes with it.

Both corrections are one computation, `B A = P E` with `P = U_r U_r^T` the projection onto the
top-r left singular vectors of `E S` for a weighting `S` (`S = I` for SVD, `S = H^(1/2)` for
EoRA), split into balanced factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qspec.compiler.numerics import Quantized, quantize
from qspec.compiler.qmodel import FACTOR_SPEC


def _matrix(a: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be 2-D, not shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} has NaN or inf")
    return m


def _out_dtype(error: np.ndarray) -> np.dtype:
    dtype = np.asarray(error).dtype
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _rank(rank: int, shape: tuple[int, int]) -> int:
    if rank < 0:
        raise ValueError(f"rank must be >= 0, not {rank}")
    return min(int(rank), *shape)


def _projected(
    e: np.ndarray, weighted: np.ndarray, r: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced factors of `U_r U_r^T e`, `U_r` the top-r left singular vectors of `weighted`.

    With `U_r^T e = A0` (rows `a_i`), `B = U_r diag(d)`, `A = diag(1/d) A0`, `d_i = sqrt|a_i|`: the
    i-th column of B and row of A have equal norms. For `weighted = e` this is `B = U sqrt(S)`,
    `A = sqrt(S) V^T`.
    """
    u = np.linalg.svd(weighted, full_matrices=False)[0][:, :r]
    a0 = u.T @ e
    d = np.sqrt(np.linalg.norm(a0, axis=1))
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    return (u * d).astype(dtype), (a0 * inv[:, None]).astype(dtype)


def svd_correction(error: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """LoRC / plain SVD: `B` `[rows, r]`, `A` `[r, cols]` minimising `||error - B A||_F`.

    `error` is `W - W_compressed` `[rows, cols]`; `B A` is its truncated SVD `U_r S_r V_r^T`, split
    as `B = U_r S_r^(1/2)`, `A = S_r^(1/2) V_r^T`; `r = min(rank, rows, cols)`.
    """
    e = _matrix(error, "error")
    r = _rank(rank, e.shape)
    return _projected(e, e, r, _out_dtype(error))


def eora_correction(
    error: np.ndarray, H: np.ndarray, rank: int, damp: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """EoRA: `B` `[rows, r]`, `A` `[r, cols]` minimising `tr((E - B A) H (E - B A)^T)`.

    `error` = E `[rows, cols]`; `H` = `X^T X` `[cols, cols]` (any positive scale: a sum or a mean).

    Eigendecompose `H = Q diag(l) Q^T` in float64, clamp negative eigenvalues (rounding) to 0 and
    raise every eigenvalue to at least `damp * mean(l)`: `l' = max(l, damp * mean(l))`. With
    `S = Q diag(sqrt l')` the objective for `H' = S S^T` is `||E S - B A S||_F^2`; its minimiser
    is the truncated SVD `U_r S_r V_r^T` of `E S` mapped back, `B A = U_r S_r V_r^T S^{-1}`.
    Since `U_r S_r V_r^T = U_r U_r^T E S`, that is exactly `B A = U_r U_r^T E`: computed so, the
    map back never multiplies by `1 / sqrt(l')`.

    Exactness: when every eigenvalue of H is at least `damp * mean(l)`, `H' = H` and this is the
    exact optimum (the objective is then the sum of the squared discarded singular values of
    `E Q diag(sqrt l)`). For a singular or ill-conditioned H (fewer samples than cols, dead
    inputs) the result is the exact optimum for `H'`, which weights directions the data never
    excites by `damp * mean(l)` instead of 0, so in them it follows E's own largest directions
    rather than an arbitrary basis; on H it is within `damp * mean(l) * ||E||_F^2` of the
    optimum. An all-zero H leaves only E: plain SVD.
    """
    e = _matrix(error, "error")
    h = _matrix(H, "H")
    if h.shape != (e.shape[1], e.shape[1]):
        raise ValueError(
            f"H must be [{e.shape[1]}, {e.shape[1]}] for error {e.shape}, not {h.shape}"
        )
    if damp < 0:
        raise ValueError(f"damp must be >= 0, not {damp}")
    r = _rank(rank, e.shape)
    lam, q = np.linalg.eigh((h + h.T) / 2)
    lam = np.maximum(lam, 0.0)
    if not (lam > 0).any():
        return _projected(e, e, r, _out_dtype(error))
    lam = np.maximum(lam, damp * lam.mean())
    return _projected(e, (e @ q) * np.sqrt(lam), r, _out_dtype(error))


def finetune(
    B: np.ndarray,
    A: np.ndarray,
    W_target: np.ndarray,
    W_compressed: np.ndarray,
    X_batches: Sequence[np.ndarray],
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Adam fine-tune of `B` `[rows, r]`, `A` `[r, cols]` on calibration inputs (INT2.1's LoRA
    error correction, at layer level).

    Objective: the mean over calibration samples x (rows of the `X_batches`, each `[n, cols]`) of
    `||x (W_compressed + B A)^T - x W_target^T||^2`, i.e. `tr(D H D^T) / N` with `D = B A - E`,
    `E = W_target - W_compressed`, `H = sum X^T X`, N samples. H is accumulated once, so every
    step takes the exact full-batch gradient in float64, at `O(r cols (rows + cols))` a step.

    Exactly `steps` Adam updates; the best iterate (including the input) wins, and the returned
    factors, cast back to B's dtype, are never worse than the input on the objective. The result
    is deterministic. `seed` matters only when both factors are all zero (a saddle point where
    the gradient vanishes): A then starts from seeded small random values and B from zero, as
    LoRA initialises. Note: on exactly this objective `eora_correction` is already the optimum
    (for H above its damping floor), so fine-tuning pays off after `svd_correction`, after a
    damped or subsampled H, or when the inputs differ from those the factors were fitted on.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, not {steps}")
    b0, a0 = _matrix(B, "B"), _matrix(A, "A")
    e = _matrix(W_target, "W_target") - _matrix(W_compressed, "W_compressed")
    rows, cols = e.shape
    r = b0.shape[1]
    if b0.shape != (rows, r) or a0.shape != (r, cols):
        raise ValueError(f"B {b0.shape} and A {a0.shape} do not fit a [{rows}, {cols}] weight")
    if not X_batches:
        raise ValueError("finetune needs at least one calibration batch")
    h = np.zeros((cols, cols))
    n = 0
    for x in X_batches:
        x = np.asarray(x, dtype=np.float64).reshape(-1, cols)
        h += x.T @ x
        n += len(x)
    objective = _layer_objective(e, h / max(n, 1))
    dtype = np.result_type(np.asarray(B).dtype, np.float32)
    start = (np.asarray(B).astype(dtype, copy=True), np.asarray(A).astype(dtype, copy=True))
    if steps == 0 or r == 0:
        return start
    params = [b0.copy(), a0.copy()]
    if not (params[0].any() or params[1].any()):
        params[1] = np.random.default_rng(seed).standard_normal((r, cols)) / np.sqrt(cols)
    moments = [np.zeros_like(p) for p in params + params]  # first, then second moments
    best, best_params = np.inf, params
    for step in range(steps + 1):  # `steps` updates; the last pass only scores the final iterate
        value, grads = objective(*params)
        if value < best:
            best, best_params = value, [p.copy() for p in params]
        if step == steps:
            break
        params = _adam_update(params, grads, moments, step + 1, lr)
    cand = (best_params[0].astype(dtype), best_params[1].astype(dtype))
    cand_value = objective(*(_matrix(m, "factor") for m in cand))[0]
    return cand if cand_value <= objective(*(_matrix(m, "factor") for m in start))[0] else start


def _layer_objective(e: np.ndarray, h: np.ndarray):
    """`f(B, A) = tr((B A - E) H (B A - E)^T)` and its gradients, expanded so that no
    `[rows, cols] x [cols, cols]` product is formed per call (G = E H precomputed):

        f = tr(B (A H A^T) B^T) - 2 tr(B A G^T) + tr(E G^T)
        df/dB = 2 (B (A H A^T) - G A^T)        df/dA = 2 (B^T B A H - B^T G)
    """
    g = e @ h
    const = float(np.sum(g * e))

    def value_and_grads(b: np.ndarray, a: np.ndarray) -> tuple[float, list[np.ndarray]]:
        ah = a @ h
        aha = ah @ a.T
        btg = b.T @ g
        value = float(np.sum(b * (b @ aha)) - 2 * np.sum(a * btg)) + const
        return value, [2 * (b @ aha - g @ a.T), 2 * ((b.T @ b) @ ah - btg)]

    return value_and_grads


def _adam_update(
    params: list[np.ndarray], grads: list[np.ndarray], moments: list[np.ndarray], t: int, lr: float
) -> list[np.ndarray]:
    """One Adam step (Kingma and Ba; beta1 0.9, beta2 0.999, eps 1e-8), updating `moments`."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    k = len(params)
    out = []
    for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
        m, v = moments[i], moments[k + i]
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad**2
        out.append(p - lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps))
    return out


def quantize_factor(M: np.ndarray) -> Quantized:
    """One factor as symmetric int8 with one fp32 scale per row (`qspec.compiler.numerics`).

    Codes are offset binary uint8 (`q + 128`, q in [-127, 127]); scale = row absmax / 127 (1 for
    an all-zero row); the nearest code, so every element is within half a step of its value.
    """
    return quantize(np.asarray(M, dtype=np.float32), FACTOR_SPEC)


def store_factors(B: np.ndarray, A: np.ndarray, factors: str) -> tuple[np.ndarray, np.ndarray]:
    """Factors rounded to their storage format: the values the artifact computes with.

    fp16: float16 arrays (values beyond fp16's range are an error, not silently saturated).
    int8: float32 arrays, the dequantized `quantize_factor` of each (store its codes and scales).
    """
    if factors == "fp16":
        out = []
        for m in (B, A):
            m = np.asarray(m)
            if m.size and np.abs(m).max() > np.finfo(np.float16).max:
                raise ValueError("factor exceeds the fp16 range: store it as int8")
            out.append(m.astype(np.float16))
        return out[0], out[1]
    if factors == "int8":
        deq = [
            quantize_factor(m).dequantize() if np.asarray(m).size else np.asarray(m, np.float32)
            for m in (B, A)
        ]
        return deq[0], deq[1]
    raise ValueError(f"unknown factor format {factors!r}: expected 'fp16' or 'int8'")


def bias_correction(W: np.ndarray, W_compressed: np.ndarray, mean_input: np.ndarray) -> np.ndarray:
    """The bias shift `(W - W_compressed) @ E[x]` `[rows]` to add to the layer's bias.

    With it `E[x W_c^T + b + shift] = E[x W^T + b]` (Nagel et al. 2019, data-driven). `mean_input`
    is `E[x]` over calibration samples, `[cols]`, or `[groups, cols]` for a grouped Conv (the
    rows of group g read its input); if a low-rank branch is present, pass `W_compressed + B A`
    (the effective stored weight).
    """
    d = _matrix(W, "W") - _matrix(W_compressed, "W_compressed")
    mu = np.asarray(mean_input, dtype=np.float64)
    mu = mu.reshape(1, -1) if mu.ndim == 1 else mu
    groups = mu.shape[0]
    if mu.shape[1] != d.shape[1] or d.shape[0] % groups:
        raise ValueError(f"mean_input {mu.shape} does not fit a [{d.shape[0]}, {d.shape[1]}] W")
    per_row = np.repeat(mu, d.shape[0] // groups, axis=0)
    return np.einsum("rc,rc->r", d, per_row).astype(_out_dtype(W))
