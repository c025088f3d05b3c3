"""The evolutionary search: budgets always kept, never worse than the start, deterministic."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qspec.passes.allocate.evolution import Problem, evolve


class Recorder:
    """A fitness that remembers every (choice, samples) it was called with.

    Separable error plus a pairwise interaction, minus noise that shrinks with more samples,
    so small-sample rankings can disagree with the full-sample one.
    """

    def __init__(self, error: np.ndarray):
        self.error = error
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __call__(self, choice: Sequence[int], samples: int) -> float:
        self.calls.append((tuple(choice), samples))
        separable = sum(self.error[u, c] for u, c in enumerate(choice))
        pairs = sum(a * b for a, b in itertools.pairwise(choice))
        noise = (hash((tuple(choice), samples)) % 100) / 100 / samples
        return float(-separable + 0.1 * pairs - noise)


@st.composite
def problems(draw: st.DrawFn) -> tuple[Problem, list[int]]:
    """2-6 units, 1-4 candidates, 1-2 metrics, budgets between the least and greatest totals.

    The start takes each unit's cheapest candidate in the first metric, and the other budgets
    are raised to the start's totals where needed, so the start is always feasible.
    """
    metrics = ["size", "bops"][: draw(st.integers(1, 2))]
    cost = st.floats(0, 100, allow_nan=False)
    costs = [
        [{k: draw(cost) for k in metrics} for _ in range(draw(st.integers(1, 4)))]
        for _ in range(draw(st.integers(2, 6)))
    ]
    start = [int(np.argmin([option[metrics[0]] for option in unit])) for unit in costs]
    budgets = {}
    for k in metrics:
        least = sum(min(option[k] for option in unit) for unit in costs)
        most = sum(max(option[k] for option in unit) for unit in costs)
        at_start = sum(costs[u][c][k] for u, c in enumerate(start))
        budgets[k] = max(least + draw(st.floats(0, 1)) * (most - least), at_start)
    return Problem(costs, budgets), start


@settings(max_examples=60, deadline=None)
@given(case=problems(), seed=st.integers(0, 2**16), samples=st.integers(1, 32))
def test_budgets_kept_and_never_worse(case: tuple[Problem, list[int]], seed: int, samples: int):
    problem, start = case
    fitness = Recorder(np.random.default_rng(seed).random((6, 4)))
    result = evolve(problem, start, fitness, samples=samples, generations=6, seed=seed)
    assert all(problem.feasible(choice) for choice, _ in fitness.calls)
    assert problem.feasible(result.choice)
    assert result.fitness >= result.start_fitness
    assert result.history == sorted(result.history) and len(result.history) == 6
    assert result.evaluations == len(fitness.calls) == len(set(fitness.calls))  # cached


def test_same_seed_same_result():
    problem, start = toy(1)
    error = np.random.default_rng(1).random((4, 4))
    runs = [evolve(problem, start, Recorder(error), samples=16, seed=7) for _ in range(2)]
    assert runs[0] == runs[1]


def toy(seed: int) -> tuple[Problem, list[int]]:
    """4 layers, bit widths 2/3/4/8, an average budget of 4 bits; start at all 2 bits."""
    rng = np.random.default_rng(seed)
    params = rng.integers(100, 1000, 4)
    costs = [[{"bits": float(b * p)} for b in (2, 3, 4, 8)] for p in params]
    return Problem(costs, {"bits": float(4 * params.sum())}), [0] * 4


@pytest.mark.parametrize("seed", range(5))
def test_reaches_the_brute_force_optimum(seed: int):
    problem, start = toy(seed)
    rng = np.random.default_rng(seed)
    error = [[weight * rng.random() * 2.0**-b for b in (2, 3, 4, 8)] for weight in range(1, 5)]

    def fitness(choice: Sequence[int], samples: int) -> float:
        return -sum(error[u][c] for u, c in enumerate(choice))

    best = max(
        fitness(choice, 1)
        for choice in itertools.product(range(4), repeat=4)
        if problem.feasible(choice)
    )
    result = evolve(problem, start, fitness, samples=8, generations=30, seed=seed)
    assert result.fitness == pytest.approx(best)


def test_selection_uses_growing_sample_counts():
    problem, start = toy(2)
    fitness = Recorder(np.random.default_rng(2).random((4, 4)))
    evolve(problem, start, fitness, samples=16, generations=5)
    counts = [samples for _, samples in fitness.calls]
    assert set(counts) == {2, 4, 8, 16}
    assert counts[0] < 16  # children are screened before the first full evaluation
    for i, (choice, samples) in enumerate(fitness.calls):
        if samples == 16 and list(choice) != start:  # a child reached full evaluation ...
            assert (choice, 8) in fitness.calls[:i]  # ... only after surviving on fewer


def test_tolerance_and_totals():
    problem = Problem([[{"size": 0.1}, {"size": 0.3}], [{"size": 0.2}]], {"size": 0.3})
    assert problem.totals([0, 0]) == {"size": pytest.approx(0.3)}
    assert problem.feasible([0, 0])  # 0.1 + 0.2 > 0.3 in floating point
    assert not problem.feasible([1, 0])


def test_infeasible_start_raises():
    problem, _ = toy(0)
    with pytest.raises(ValueError, match="budget"):
        evolve(problem, [3, 3, 3, 3], Recorder(np.zeros((4, 4))), samples=4)
    with pytest.raises(ValueError, match="one candidate index per unit"):
        evolve(problem, [0, 0, 0], Recorder(np.zeros((4, 4))), samples=4)
