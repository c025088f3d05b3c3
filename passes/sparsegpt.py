"""SparseGPT (Frantar & Alistarh 2023): prune a weight to an N:M pattern or a ratio while the
remaining weights absorb the error, minimising tr((W - Ŵ) H (W - Ŵ)ᵀ), H = XᵀX / n.

Columns are visited in order; the mask of each m-group (N:M), or of each block of columns per
row (ratio), keeps the weights of highest OBS saliency w² / [H⁻¹]_jj², and every pruned weight's
error is spread over the columns not yet visited by the OBS update. The solver is the one GPTQ
uses (`obs.py`); when the layer is also rounded with GPTQ, both run in one column loop
(`gptq.gptq(pattern=...)`), as in the paper's joint mode.
"""

from __future__ import annotations

import numpy as np

from qspec.passes.obs import solve


def sparsegpt(
    W: np.ndarray, H: np.ndarray, pattern: tuple[int, int] | float
) -> tuple[np.ndarray, np.ndarray]:
    """(updated weight [rows, cols] float32, mask bool [rows, cols], True = kept)."""
    result = solve(W, H, spec=None, sparsity=pattern)
    assert result.mask is not None
    return result.weight, result.mask
