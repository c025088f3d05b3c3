"""Evolutionary refinement of an allocation (EvoPress, Sieberling et al. 2024).

The ILP in `allocate` is optimal for an additive error proxy, but a compressed model's real
loss is not additive across units. EvoPress searches the same space with the real loss as the
fitness f_n (higher is better, measured on n calibration samples), starting from the ILP answer:

    x ← start                                  Σ_u cost_k[u][x_u] ≤ B_k for every budget k
    each generation:
        C ← λ level-switch mutations of x, each repaired to keep every budget
        for n in N/8, N/4, N/2, N:             multi-step selection on growing sample counts
            C ← best ⌈|C|/2⌉ of C by f_n       (the single best at n = N)
        x ← c  if f_N(c) > f_N(x)              elitism: never worse than the start

Small sample counts are cheap and noisy but enough to discard most children, so only the last
survivor pays for all N samples. Fitness values are cached by (choice, samples).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Fitness = Callable[[Sequence[int], int], float]

TOLERANCE = 1e-9  # relative slack on each budget, for float sums of costs
REPAIRS_PER_UNIT = 4  # budget repairs allowed per child, per unit
TRIES_PER_CHILD = 10  # mutations allowed per wanted child before a generation gives up


def _within(total: float, bound: float) -> bool:
    return total <= bound + TOLERANCE * abs(bound)


@dataclass(frozen=True)
class Problem:
    """One candidate per unit (layer or tie group), additive costs, a bound on each total."""

    costs: Sequence[Sequence[Mapping[str, float]]]  # [unit][candidate] -> metric -> cost
    budgets: Mapping[str, float]  # metric -> bound on the total

    def totals(self, choice: Sequence[int]) -> dict[str, float]:
        """Each budgeted metric summed over the units' chosen candidates."""
        return {
            k: float(sum(self.costs[u][c][k] for u, c in enumerate(choice))) for k in self.budgets
        }

    def feasible(self, choice: Sequence[int]) -> bool:
        totals = self.totals(choice)
        return all(_within(totals[k], bound) for k, bound in self.budgets.items())


@dataclass(frozen=True)
class Evolution:
    choice: list[int]  # the best choice found (the start if nothing beat it)
    fitness: float  # its fitness on all samples
    start_fitness: float  # the start's fitness on all samples
    history: list[float]  # best full-sample fitness after each generation
    evaluations: int  # fitness calls made


def _most_violated(problem: Problem, choice: Sequence[int]) -> str | None:
    """The budget exceeded by the largest fraction of its bound, or None when all are met.

    Relative excess makes metrics of different scales (bits vs. milliseconds) comparable.
    """
    totals = problem.totals(choice)
    excess = {
        k: (totals[k] - bound) / (abs(bound) or 1.0)
        for k, bound in problem.budgets.items()
        if not _within(totals[k], bound)
    }
    return max(excess, key=excess.__getitem__) if excess else None


def _cheaper(options: Sequence[Mapping[str, float]], current: int, metric: str) -> int | None:
    """The candidate one level cheaper than `current` in `metric` (the smallest saving), so a
    repair disturbs the unit as little as it can; None when `current` is already the cheapest."""
    now = options[current][metric]
    cheaper = [(option[metric], c) for c, option in enumerate(options) if option[metric] < now]
    return max(cheaper)[1] if cheaper else None


def _mutate(problem: Problem, parent: Sequence[int], rng: np.random.Generator) -> list[int] | None:
    """A level-switch child of `parent` that meets every budget, or None.

    1-3 random units switch to another random candidate (EvoPress samples the number of
    mutations); while a budget is broken, another random unit steps down to its next cheaper
    candidate in the most-violated metric. Repairs skip the mutated units, which they would
    undo, and are bounded because fixing one metric can break another.
    """
    costs = problem.costs
    mutable = [u for u, options in enumerate(costs) if len(options) > 1]
    if not mutable:
        return None
    child = list(parent)
    count = min(int(rng.integers(1, 4)), len(mutable))
    switched = [int(u) for u in rng.choice(mutable, size=count, replace=False)]
    for u in switched:
        others = [c for c in range(len(costs[u])) if c != child[u]]
        child[u] = others[rng.integers(len(others))]
    for _ in range(REPAIRS_PER_UNIT * len(child)):
        metric = _most_violated(problem, child)
        if metric is None:
            return child
        steps = {  # unit -> its next cheaper candidate
            u: c
            for u in range(len(child))
            if u not in switched and (c := _cheaper(costs[u], child[u], metric)) is not None
        }
        if not steps:
            return None
        u = list(steps)[rng.integers(len(steps))]
        child[u] = steps[u]
    return child if problem.feasible(child) else None


def _offspring(
    problem: Problem, parent: Sequence[int], count: int, rng: np.random.Generator
) -> list[list[int]]:
    """Up to `count` distinct feasible children, none equal to the parent.

    Fewer when the neighbourhood is small: retries are bounded so a tight budget cannot stall.
    """
    seen = {tuple(parent)}
    children: list[list[int]] = []
    for _ in range(TRIES_PER_CHILD * count):
        if len(children) == count:
            break
        child = _mutate(problem, parent, rng)
        if child is not None and tuple(child) not in seen:
            seen.add(tuple(child))
            children.append(child)
    return children


def _stages(samples: int) -> list[int]:
    """Sample counts N/8, N/4, N/2, N for the selection steps (at least 1 each, no repeats)."""
    return sorted({max(1, samples >> k) for k in range(4)})


def _select(
    children: list[list[int]], score: Callable[[Sequence[int], int], float], samples: int
) -> list[int] | None:
    """EvoPress multi-step selection: halve the children on each growing sample count, keep
    the single best on all samples (None when there are no children)."""
    survivors = children
    for n in _stages(samples):
        keep = 1 if n == samples else (len(survivors) + 1) // 2
        values = [score(child, n) for child in survivors]
        order = sorted(range(len(survivors)), key=values.__getitem__, reverse=True)
        survivors = [survivors[i] for i in order[:keep]]
    return survivors[0] if survivors else None


def evolve(
    problem: Problem,
    start: Sequence[int],
    fitness: Fitness,
    *,
    samples: int,
    generations: int = 20,
    offspring: int = 8,
    seed: int = 0,
) -> Evolution:
    """A (1 + λ) evolutionary search from `start` (the ILP solution) that keeps every budget.

    Deterministic for a given `seed`; the result is never worse than `start` on all samples.
    """
    if len(start) != len(problem.costs) or not all(
        0 <= c < len(options) for c, options in zip(start, problem.costs, strict=True)
    ):
        raise ValueError("the start needs one candidate index per unit")
    if not problem.feasible(start):
        raise ValueError(f"the start breaks a budget: totals {problem.totals(start)}")
    if samples < 1 or offspring < 1 or generations < 0:
        raise ValueError("samples and offspring must be positive, generations not negative")
    rng = np.random.default_rng(seed)
    cache: dict[tuple[tuple[int, ...], int], float] = {}

    def score(choice: Sequence[int], n: int) -> float:
        key = (tuple(choice), n)
        if key not in cache:
            cache[key] = float(fitness(list(choice), n))
        return cache[key]

    parent = [int(c) for c in start]
    history: list[float] = []
    for _ in range(generations):
        best = _select(_offspring(problem, parent, offspring, rng), score, samples)
        if best is not None and score(best, samples) > score(parent, samples):
            parent = best
        history.append(score(parent, samples))
    return Evolution(
        choice=parent,
        fitness=score(parent, samples),
        start_fitness=score(start, samples),
        history=history,
        evaluations=len(cache),
    )
