"""The allocation ILP against brute force on small random instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qspec.passes.allocate.ilp import Candidate, Infeasible, allocate, smallest_totals


def instance(seed: int, layers: int, options: int):
    rng = np.random.default_rng(seed)
    table = []
    for _ in range(layers):
        params = rng.integers(100, 1000)
        bits = np.sort(rng.choice([2, 3, 4, 6, 8], options, replace=False))
        error = np.sort(rng.random(options))[::-1] * params  # more bits, less error
        table.append(
            [
                Candidate(float(e), {"bits": float(b * params), "bytes": float(b * params / 8)})
                for e, b in zip(error, bits, strict=True)
            ]
        )
    return table


def brute_force(table, budgets, ties=()):
    best = None
    for choice in itertools.product(*(range(len(options)) for options in table)):
        if any(len({choice[i] for i in group}) > 1 for group in ties):
            continue
        totals = {k: sum(table[i][c].costs[k] for i, c in enumerate(choice)) for k in budgets}
        if any(totals[k] > bound + 1e-9 for k, bound in budgets.items()):
            continue
        error = sum(table[i][c].error for i, c in enumerate(choice))
        if best is None or error < best[0] - 1e-9:
            best = (error, choice)
    return best


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 5), options=st.integers(2, 4))
def test_optimal_like_brute_force(seed: int, layers: int, options: int):
    table = instance(seed, layers, options)
    lowest = smallest_totals(table, ["bits"])["bits"]
    highest = sum(max(c.costs["bits"] for c in opts) for opts in table)
    budgets = {"bits": lowest + (highest - lowest) * (seed % 7) / 7, "bytes": highest / 8}
    expected = brute_force(table, budgets)
    chosen = allocate(table, budgets)
    error = sum(table[i][c].error for i, c in enumerate(chosen))
    assert expected is not None
    assert error == pytest.approx(expected[0], rel=1e-9, abs=1e-9)


def test_ties_pick_the_same_candidate():
    table = instance(3, 4, 3)
    budgets = {"bits": smallest_totals(table, ["bits"])["bits"] * 1.4}
    ties = [[0, 2]]
    chosen = allocate(table, budgets, ties)
    assert chosen[0] == chosen[2]
    expected = brute_force(table, budgets, ties)
    assert sum(table[i][c].error for i, c in enumerate(chosen)) == pytest.approx(expected[0])


def test_infeasible_budget_names_the_smallest_achievable_total():
    table = instance(1, 3, 3)
    lowest = smallest_totals(table, ["bits"])["bits"]
    with pytest.raises(Infeasible) as caught:
        allocate(table, {"bits": lowest * 0.9})
    assert caught.value.violated == "bits"
    assert caught.value.smallest["bits"] == pytest.approx(lowest)
    assert f"{lowest:g}" in str(caught.value)


def test_budgets_that_only_fail_together():
    """Each budget alone can be met, but the cheap candidate in one metric is the dear one in
    the other."""
    options = [Candidate(0.0, {"a": 1, "b": 3}), Candidate(0.0, {"a": 3, "b": 1})]
    with pytest.raises(Infeasible) as caught:
        allocate([options, options], {"a": 3, "b": 3})
    assert caught.value.violated is None
    assert all(type(c) is int for c in allocate([options, options], {"a": 4}))  # JSON-able
    assert caught.value.smallest == {"a": 2, "b": 2}
    assert "cannot all be met at once" in str(caught.value)
