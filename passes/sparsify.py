"""sparsify: masks along the reduction dimension, N:M groups or an unstructured ratio per row.

Scores: magnitude |W|; wanda |W| times the input column norm (Sun et al. 2023); sparsegpt the
OBS saliency with a weight update of the remaining weights (Frantar & Alistarh 2023). When a
SparseGPT layer is also rounded with GPTQ, the mask is chosen jointly with the rounding in the
quantize pass, as in SparseGPT's joint mode.
"""

from __future__ import annotations

import numpy as np

from qspec.compiler.capture import matrix
from qspec.compiler.obs import solve
from qspec.compiler.pipeline import State
from qspec.compiler.resolve import SparsityPlan


def run(state: State) -> State:
    modules = dict(state.graph.module.named_modules())
    for name, plan in state.plan.layers.items():
        sparsity = plan.sparsity
        if sparsity is None or not state.in_scope(name):
            continue
        if sparsity.method == "sparsegpt" and plan.weight and plan.weight.rounding == "gptq":
            continue  # joint with GPTQ in the quantize pass
        weight = matrix(plan.layer, modules[name].weight.detach().float()).numpy()
        if sparsity.method == "sparsegpt":
            result = solve(weight, state.stats[name].hessian, spec=None, sparsity=pattern(sparsity))
            assert result.mask is not None
            state.weights[name], state.masks[name] = result.weight, result.mask
            continue
        score = np.abs(weight)
        if sparsity.method == "wanda":
            score = score * np.sqrt(np.diag(state.stats[name].xtx))[None, :]
        mask = keep_mask(score, sparsity)
        state.weights[name], state.masks[name] = weight * mask, mask
    return state


def pattern(sparsity: SparsityPlan) -> tuple[int, int] | float:
    if sparsity.n is not None and sparsity.m is not None:
        return (sparsity.n, sparsity.m)
    assert sparsity.ratio is not None
    return sparsity.ratio


def keep_mask(score: np.ndarray, sparsity: SparsityPlan) -> np.ndarray:
    """True for the weights to keep: the n highest scores of every m consecutive columns, or the
    (1 - ratio) highest of each row."""
    rows, cols = score.shape
    if sparsity.m is not None and sparsity.n is not None:
        groups = score.reshape(rows, cols // sparsity.m, sparsity.m)
        order = np.argsort(-groups, axis=-1, kind="stable")
        keep = np.zeros_like(groups, dtype=bool)
        np.put_along_axis(keep, order[..., : sparsity.n], True, axis=-1)
        return keep.reshape(rows, cols)
    assert sparsity.ratio is not None
    kept = cols - round(sparsity.ratio * cols)
    order = np.argsort(-score, axis=1, kind="stable")
    keep = np.zeros_like(score, dtype=bool)
    np.put_along_axis(keep, order[:, :kept], True, axis=1)
    return keep
