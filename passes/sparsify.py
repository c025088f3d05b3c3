"""sparsify: masks along the reduction dimension, N:M groups or an unstructured ratio per row.

By the layer's method in `methods.PRUNING`: magnitude |W|; wanda |W| times the input column
norm (Sun et al. 2023); sparsegpt the OBS saliency with a weight update of the remaining
weights (`sparsegpt.py`). A method solved jointly with the layer's rounding (SparseGPT with
GPTQ) is left to the quantize pass.
"""

from __future__ import annotations

from qspec.compiler.capture import float_matrix
from qspec.compiler.state import State
from qspec.passes.methods import PRUNING, joint_pattern


def run(state: State) -> State:
    modules = dict(state.graph.module.named_modules())
    for name, plan in state.plan.layers.items():
        sparsity = plan.sparsity
        if sparsity is None or not state.in_scope(name) or joint_pattern(plan) is not None:
            continue
        weight = float_matrix(plan.layer, modules[name])
        prune = PRUNING[sparsity.method].apply
        state.weights[name], state.masks[name] = prune(weight, state.stats.get(name), sparsity)
    return state
