"""compensate: correct what compression left, per layer.

`compensate lora rank r by svd|eora` (`methods.CORRECTION`, algorithms in `lowrank.py`): a
low-rank residual path B A fitted to the error E = W - W_compressed, by plain SVD (LoRC, Yao et
al. 2023) or in the eigenspace of the layer's input second moment (EoRA, Liu et al. 2024),
optionally fine-tuned on the calibration second moment (LoRA error correction as in INT2.1),
stored in fp16 or int8.
`compensate bias`: shift the bias by the expected output error (W - W_compressed) E[x]
(Nagel et al. 2019).
"""

from __future__ import annotations

import numpy as np

from qspec.compiler.capture import float_matrix
from qspec.compiler.state import State
from qspec.passes.lowrank import bias_correction, finetune, store_factors
from qspec.passes.methods import CORRECTION


def run(state: State) -> State:
    modules = dict(state.graph.module.named_modules())
    for name, plan in state.plan.layers.items():
        compressed = state.qmodel.get(name)
        if compressed is None or not state.in_scope(name):
            continue
        target = float_matrix(plan.layer, modules[name])
        lowrank = plan.lowrank
        if lowrank is not None:
            current = compressed.effective_weight()
            error = target - current
            hessian = state.hessian(name)
            up, down = CORRECTION[lowrank.method].apply(error, hessian, lowrank.rank)
            if lowrank.finetune_steps:
                assert hessian is not None
                inputs = [_square_root(hessian)]
                up, down = finetune(up, down, target, current, inputs, lowrank.finetune_steps)
            compressed.lowrank = store_factors(up, down, lowrank.factors)
        if plan.bias_correction and compressed.weight is not None:
            stats = state.stats[name]
            if stats.input_sum is None:
                compressed.notes.append("bias correction skipped: no input mean (an embedding)")
                continue
            shift = bias_correction(target, compressed.effective_weight(), stats.mean_input)
            base = compressed.bias if compressed.bias is not None else np.zeros(len(shift))
            compressed.bias = (base + shift).astype(np.float32)
    return state


def _square_root(hessian: np.ndarray) -> np.ndarray:
    """X with XᵀX = H: fine-tuning needs only the second moment, not the activations."""
    values, vectors = np.linalg.eigh(hessian)
    return (vectors * np.sqrt(np.clip(values, 0, None))).T
