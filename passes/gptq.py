"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh 2022): round a weight column by column so that
the layer's output error on calibration inputs stays small,

    min_Q ||X Wᵀ - X Qᵀ||²  =  min_Q tr((W - Q) H (W - Q)ᵀ),   H = XᵀX / n.

Column j is rounded onto the quantizer's grid and its error is spread over the columns not yet
rounded by the Optimal Brain Surgeon update W[:, j:] -= (w_j - q_j) / U_jj · U[j, j:], U the
upper Cholesky factor of H⁻¹. The column loop, damping, act-order and static groups are those of
the OBS solver GPTQ shares with SparseGPT (`obs.py`, where each choice is explained). Scales are
fitted once on the whole weight (with `search clip`'s ratios), so groups stay contiguous.

With a SparseGPT pattern the mask is chosen in the same column loop (SparseGPT's joint mode);
with a mask chosen beforehand (magnitude, Wanda) its zeros stay zero while their error is spread
over the kept weights. Without a mask the result is never worse than round-to-nearest on H.
"""

from __future__ import annotations

import numpy as np

from qspec.compiler.numerics import QuantSpec
from qspec.passes.obs import OBSResult, solve


def gptq(
    W: np.ndarray,
    H: np.ndarray,
    quantizer: QuantSpec,
    *,
    damp: float = 0.01,
    actorder: bool = False,
    clip: float | np.ndarray = 1.0,
    keep: np.ndarray | None = None,
    pattern: tuple[int, int] | float | None = None,
) -> OBSResult:
    """Codes for W [rows, cols] given H [cols, cols]; `keep` a fixed mask, `pattern` an N:M
    pattern or ratio pruned jointly (at most one of the two)."""
    assert keep is None or pattern is None
    return solve(
        W,
        H,
        spec=quantizer,
        sparsity=pattern,
        percdamp=damp,
        actorder=actorder,
        clip=clip,
        keep=keep,
    )
