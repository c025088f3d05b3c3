"""Exact mixed-precision allocation: one candidate per layer, least total error, every budget.

A 0-1 integer linear program (HAWQ-V3 style), solved to proven optimality by HiGHS through
`scipy.optimize.milp`:

    minimise    Σ_l Σ_c error[l][c] · x[l,c]
    subject to  Σ_c x[l,c] = 1                          every layer picks one candidate
                Σ_l Σ_c cost_k[l][c] · x[l,c] ≤ B_k      every budget k
                x[a,c] = x[b,c]                         tied layers pick the same candidate
                x ∈ {0, 1}

Costs are additive per layer (bytes, BOPs, latency, and bits x parameters for an average-bits
budget, whose bound is B x total parameters). When no assignment meets the budgets, the error
names the smallest achievable value of each budget taken alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp


@dataclass(frozen=True)
class Candidate:
    error: float
    costs: Mapping[str, float]


class Infeasible(Exception):
    """No assignment meets the budgets. `violated` is a budget that cannot be met even alone
    (None: each can, but not all at once); `smallest` holds each one's least achievable total."""

    def __init__(self, violated: str | None, smallest: dict[str, float]):
        self.violated = violated
        self.smallest = smallest
        if violated is None:
            super().__init__("the budgets cannot all be met at once")
        else:
            super().__init__(
                f"budget '{violated}' cannot be met: the smallest achievable total is "
                f"{smallest[violated]:g}"
            )


def smallest_totals(
    layers: Sequence[Sequence[Candidate]], metrics: Sequence[str]
) -> dict[str, float]:
    """Each metric's least total over all assignments, ignoring the other budgets."""
    return {k: float(sum(min(c.costs[k] for c in options) for options in layers)) for k in metrics}


def allocate(
    layers: Sequence[Sequence[Candidate]],
    budgets: Mapping[str, float],
    ties: Sequence[Sequence[int]] = (),
) -> list[int]:
    """The candidate index chosen for each layer (an optimal solution of the program above)."""
    offsets = np.cumsum([0, *(len(options) for options in layers)])
    count = int(offsets[-1])
    error = np.array([c.error for options in layers for c in options], dtype=np.float64)
    # one-of-each-layer rows, as a sparse matrix: dense would be layers x candidates
    layer_of = np.repeat(np.arange(len(layers)), np.diff(offsets))
    blocks = [sparse.csr_matrix((np.ones(count), (layer_of, np.arange(count))))]
    lower, upper = [np.ones(len(layers))], [np.ones(len(layers))]
    for metric, bound in budgets.items():
        costs = [c.costs[metric] for options in layers for c in options]
        blocks.append(sparse.csr_matrix(np.array([costs], dtype=np.float64)))
        lower.append(np.array([-np.inf]))
        upper.append(np.array([bound]))
    for group in ties:
        first = group[0]
        for other in group[1:]:
            width = len(layers[first])
            if len(layers[other]) != width:
                raise ValueError("tied layers need the same candidates")
            columns = np.concatenate(
                [offsets[first] + np.arange(width), offsets[other] + np.arange(width)]
            )
            values = np.concatenate([np.ones(width), -np.ones(width)])
            rows = np.tile(np.arange(width), 2)
            blocks.append(sparse.csr_matrix((values, (rows, columns)), shape=(width, count)))
            lower.append(np.zeros(width))
            upper.append(np.zeros(width))
    result = milp(
        error,
        constraints=LinearConstraint(
            sparse.vstack(blocks), np.concatenate(lower), np.concatenate(upper)
        ),
        integrality=np.ones(count),
        bounds=Bounds(0, 1),
    )
    if result.status == 2 or result.x is None:  # infeasible
        smallest = smallest_totals(layers, list(budgets))
        violated = next((k for k, bound in budgets.items() if smallest[k] > bound), None)
        raise Infeasible(violated, smallest)
    if not result.success:
        raise RuntimeError(f"the allocation program was not solved: {result.message}")
    chosen = np.round(result.x).astype(int)
    return [int(np.argmax(chosen[offsets[i] : offsets[i + 1]])) for i in range(len(layers))]
