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
from scipy.optimize import Bounds, LinearConstraint, linprog, milp


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
    """The candidate index chosen for each layer (an optimal solution of the program above).

    Reduced-cost fixing keeps the exact program small: with the LP relaxation's optimum z_lp
    and reduced costs d, any assignment that picks a candidate j costs at least z_lp + d_j. So
    the program is solved over the candidates with d_j <= gap only (tied layers keep all
    theirs); an optimum z* <= z_lp + gap of that restriction is optimal for the whole program,
    otherwise the gap widens to z* - z_lp (or to everything when the restriction is infeasible)
    and it is solved again."""
    relaxed = _solve(layers, budgets, ties, relax=True)
    if relaxed.status == 2:
        raise _infeasible(layers, budgets)
    offsets = np.cumsum([0, *(len(options) for options in layers)])
    reduced_cost = [
        relaxed.lower.marginals[offsets[i] : offsets[i + 1]] for i in range(len(layers))
    ]
    tied = {i for group in ties for i in group}
    gap = 1e-6 * max(1.0, abs(relaxed.fun))
    while True:
        kept = [
            list(range(len(options)))
            if i in tied
            else [int(c) for c in np.flatnonzero(reduced_cost[i] <= gap)]
            for i, options in enumerate(layers)
        ]
        choice, objective, status = _restricted(layers, budgets, ties, kept)
        everything = all(len(k) == len(o) for k, o in zip(kept, layers, strict=True))
        if status == 0 and (everything or objective <= relaxed.fun + gap * (1 + 1e-9)):
            return choice
        if status == 0:
            gap = objective - relaxed.fun
        elif not everything:
            gap = np.inf  # an integer-infeasible restriction: solve the whole program
        else:
            raise _infeasible(layers, budgets)


def _restricted(layers, budgets, ties, kept) -> tuple[list[int], float, int]:
    """The program over the kept candidates only. Layers left with one candidate are decided:
    their costs come off the budgets and only the others enter HiGHS."""
    free = [i for i, k in enumerate(kept) if len(k) > 1]
    decided = {i: kept[i][0] for i, k in enumerate(kept) if len(k) == 1}
    spent = {m: sum(layers[i][c].costs[m] for i, c in decided.items()) for m in budgets}
    fixed_error = sum(layers[i][c].error for i, c in decided.items())
    position = {layer: p for p, layer in enumerate(free)}
    sub_ties = [[position[i] for i in group] for group in ties]
    sub_layers = [[layers[i][c] for c in kept[i]] for i in free]
    remaining = {m: bound - spent[m] for m, bound in budgets.items()}
    if not free:
        feasible = all(v >= -1e-9 * max(1.0, abs(budgets[m])) for m, v in remaining.items())
        return [decided[i] for i in range(len(layers))], fixed_error, 0 if feasible else 2
    result = _solve(sub_layers, remaining, sub_ties, relax=False)
    if result.status != 0:
        return [], np.inf, result.status
    values = np.round(result.x).astype(int)
    starts = np.cumsum([0, *(len(options) for options in sub_layers)])
    for p, i in enumerate(free):
        decided[i] = kept[i][int(np.argmax(values[starts[p] : starts[p + 1]]))]
    return [decided[i] for i in range(len(layers))], fixed_error + result.fun, 0


def _solve(layers, budgets, ties, relax: bool):
    """The program (or its LP relaxation, with reduced costs) solved by HiGHS."""
    offsets = np.cumsum([0, *(len(options) for options in layers)])
    error = np.array([c.error for options in layers for c in options], dtype=np.float64)
    choice, equal, limits, bounds = _constraints(layers, offsets, budgets, ties)
    if relax:
        result = linprog(
            error, A_ub=limits, b_ub=bounds, A_eq=choice, b_eq=equal, bounds=(0, 1), method="highs"
        )
    else:
        rows = [LinearConstraint(choice, equal, equal)]
        if limits is not None:
            rows.append(LinearConstraint(limits, -np.inf, bounds))
        result = milp(
            error,
            constraints=rows,
            integrality=np.ones(len(error)),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0},
        )
    if result.status not in (0, 2):
        raise RuntimeError(f"the allocation program was not solved: {result.message}")
    return result


def _constraints(layers, offsets, budgets, ties):
    """The rows of the program: one-of-each-layer and tie equalities, budget inequalities."""
    count = int(offsets[-1])
    layer_of = np.repeat(np.arange(len(layers)), np.diff(offsets))
    rows = [sparse.csr_matrix((np.ones(count), (layer_of, np.arange(count))))]
    equal = [np.ones(len(layers))]
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
            pairs = np.tile(np.arange(width), 2)
            rows.append(sparse.csr_matrix((values, (pairs, columns)), shape=(width, count)))
            equal.append(np.zeros(width))
    limits = None
    if budgets:
        costs = [[c.costs[k] for options in layers for c in options] for k in budgets]
        limits = sparse.csr_matrix(np.array(costs, dtype=np.float64))
    return (
        sparse.vstack(rows).tocsr(),
        np.concatenate(equal),
        limits,
        np.array(list(budgets.values()), dtype=np.float64),
    )


def _infeasible(layers, budgets) -> Infeasible:
    smallest = smallest_totals(layers, list(budgets))
    violated = next((k for k, bound in budgets.items() if smallest[k] > bound), None)
    return Infeasible(violated, smallest)
