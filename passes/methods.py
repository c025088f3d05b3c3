"""The one table of compression methods: what each needs from the passes before it, and the
function that applies it. Passes and the driver ask this table; none compares method names.

A new method is one entry here (plus its word in the language's vocabulary, `dsl/vocabulary`,
which a test keeps equal to this table): its algorithm in a file of its own under `passes/`.

Needs:
- `hessian`: the layer's input second moment XᵀX, which calibration collects only for layers
  whose methods ask for it (it is cols² floats).
- `sequential`: the method updates weights for the inputs they will really see, so calibration
  runs block by block through the blocks already compressed (GPTQ, SparseGPT).
- `joint`: a pruning method that, when the layer is also rounded by the named rounding method,
  is solved inside that rounding's column loop instead of in the sparsify pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from qspec.compiler.numerics import Quantized, QuantSpec, quantize
from qspec.compiler.resolve import LayerPlan, SparsityPlan, WeightPlan
from qspec.compiler.state import LayerStats
from qspec.passes import lowrank
from qspec.passes.gptq import gptq
from qspec.passes.sparsegpt import sparsegpt


@dataclass(frozen=True)
class Needs:
    hessian: bool = False
    sequential: bool = False
    joint: str | None = None  # rounding method this pruning is solved jointly with


@dataclass
class Rounded:
    """A rounding method's result: the codes, a mask chosen jointly, and what to report."""

    quantized: Quantized
    mask: np.ndarray | None = None
    warnings: tuple[str, ...] = ()


Clip = float | np.ndarray  # one ratio, or one per block
Pattern = tuple[int, int] | float | None  # N:M, a ratio, or no joint pruning
Mask = np.ndarray | None  # bool [rows, cols], True = kept

# weight [rows, cols], quantizer, H (None: no shared input), clip ratios, the plan, a mask kept
# fixed, and a pattern to prune jointly.
RoundFn = Callable[
    [np.ndarray, QuantSpec, np.ndarray | None, Clip, WeightPlan, Mask, Pattern], Rounded
]
# weight, the layer's statistics, the pattern -> (weight, mask): the weight may be updated.
PruneFn = Callable[[np.ndarray, LayerStats | None, SparsityPlan], tuple[np.ndarray, np.ndarray]]
# error [rows, cols], H, rank -> (up [rows, r], down [r, cols]).
CorrectFn = Callable[[np.ndarray, np.ndarray | None, int], tuple[np.ndarray, np.ndarray]]


F = TypeVar("F")


@dataclass(frozen=True)
class Method(Generic[F]):
    needs: Needs
    apply: F


def _nearest(
    weight: np.ndarray,
    quantizer: QuantSpec,
    _hessian: np.ndarray | None,
    clip: Clip,
    _plan: WeightPlan,
    _keep: Mask,
    _pattern: Pattern,
) -> Rounded:
    return Rounded(quantize(weight, quantizer, clip))


def _gptq(
    weight: np.ndarray,
    quantizer: QuantSpec,
    hessian: np.ndarray | None,
    clip: Clip,
    plan: WeightPlan,
    keep: Mask,
    pattern: Pattern,
) -> Rounded:
    if hessian is None:
        warning = "GPTQ needs one input shared by all rows: rounded to nearest instead"
        return Rounded(quantize(weight, quantizer, clip), warnings=(warning,))
    result = gptq(
        weight,
        hessian,
        quantizer,
        damp=plan.damp,
        actorder=plan.actorder,
        clip=clip,
        keep=keep if pattern is None else None,
        pattern=pattern,
    )
    assert result.quantized is not None
    return Rounded(result.quantized, result.mask, tuple(result.warnings))


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


def _magnitude(
    weight: np.ndarray, _stats: LayerStats | None, sparsity: SparsityPlan
) -> tuple[np.ndarray, np.ndarray]:
    mask = keep_mask(np.abs(weight), sparsity)
    return weight * mask, mask


def _wanda(
    weight: np.ndarray, stats: LayerStats | None, sparsity: SparsityPlan
) -> tuple[np.ndarray, np.ndarray]:
    """Wanda (Sun et al. 2023): |W| times the norm of the input column it multiplies."""
    assert stats is not None
    mask = keep_mask(np.abs(weight) * stats.input_norms[None, :], sparsity)
    return weight * mask, mask


def _sparsegpt(
    weight: np.ndarray, stats: LayerStats | None, sparsity: SparsityPlan
) -> tuple[np.ndarray, np.ndarray]:
    assert stats is not None
    return sparsegpt(weight, stats.hessian, sparsity.pattern)


def _svd(
    error: np.ndarray, _hessian: np.ndarray | None, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    return lowrank.svd_correction(error, rank)


def _eora(
    error: np.ndarray, hessian: np.ndarray | None, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    assert hessian is not None
    return lowrank.eora_correction(error, hessian, rank)


ROUNDING: dict[str, Method[RoundFn]] = {
    "nearest": Method(Needs(), _nearest),
    "gptq": Method(Needs(hessian=True, sequential=True), _gptq),
}
PRUNING: dict[str, Method[PruneFn]] = {
    "magnitude": Method(Needs(), _magnitude),
    "wanda": Method(Needs(hessian=True), _wanda),
    "sparsegpt": Method(Needs(hessian=True, sequential=True, joint="gptq"), _sparsegpt),
}
CORRECTION: dict[str, Method[CorrectFn]] = {
    "svd": Method(Needs(), _svd),
    "eora": Method(Needs(hessian=True), _eora),
}


def needs(plan: LayerPlan) -> list[Needs]:
    """What the methods of a layer's plan need."""
    found = []
    if plan.weight is not None:
        found.append(ROUNDING[plan.weight.rounding].needs)
    if plan.sparsity is not None:
        found.append(PRUNING[plan.sparsity.method].needs)
    if plan.lowrank is not None:
        found.append(CORRECTION[plan.lowrank.method].needs)
    return found


def needs_hessian(plan: LayerPlan) -> bool:
    """Whether calibration must collect XᵀX for this layer: a method asks for it, quantizer
    search and low-rank fine-tuning score by it, and sensitivity measures every candidate's
    output error with it."""
    weight, lowrank_plan = plan.weight, plan.lowrank
    return bool(
        any(n.hessian for n in needs(plan))
        or (weight and weight.search)
        or (lowrank_plan and lowrank_plan.finetune_steps)
        or plan.candidates
    )


def sequential(plans: list[LayerPlan]) -> bool:
    """Whether any layer's methods want calibration through already-compressed blocks."""
    return any(n.sequential for plan in plans for n in needs(plan))


def joint_pattern(plan: LayerPlan) -> tuple[int, int] | float | None:
    """The pattern the rounding method prunes in its own loop, when the layer's pruning method
    is solved jointly with it."""
    if plan.sparsity is None or plan.weight is None:
        return None
    joint = PRUNING[plan.sparsity.method].needs.joint
    return plan.sparsity.pattern if joint == plan.weight.rounding else None
