"""allocate: decide every `weight choose [...]` under the spec's budgets.

`sensitivity` measures each candidate; the exact ILP of `ilp.py` picks the combination with
the least total error that meets every budget at once, tied layers choosing together; `allocate
evolution` then searches from that choice on an end-to-end fitness (`evolution.py`). The result
is an ordinary Plan, so the passes run on it as on any spec.

Budgets are totals over the whole model. What does not choose (other layers, embeddings, the
graph itself) is a fixed part: its bytes and latency are measured once on an artifact emitted
with every choosing layer left in float, and the ILP gets the rest of each budget.
`weight bits` is the average over the choosing layers of the bits their codes and low-rank
factors take (scales and zero points are in `size`, not here): int4 group 32 counts 4.0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qspec.compiler.costs import CostModel
from qspec.compiler.errors import InfeasibleBudget, UserError
from qspec.compiler.layercache import Entry, cost_model
from qspec.compiler.qmodel import float_param_bytes
from qspec.compiler.resolve import Plan
from qspec.compiler.source import Batch
from qspec.compiler.state import State
from qspec.dsl import ir
from qspec.dsl.diagnostics import Note
from qspec.dsl.patterns import tie_key
from qspec.passes.allocate.budgets import bops, in_unit, limit_text, show
from qspec.passes.allocate.evolution import Problem, evolve
from qspec.passes.allocate.ilp import Candidate, Infeasible, allocate, smallest_totals
from qspec.passes.allocate.sensitivity import (
    Sensitivity,
    layer_inputs,
    measure,
    stand_in,
)
from qspec.passes.allocate.stitch import Stitched

FIXED = "fixed"  # the cache's kind for the costs of what does not choose


@dataclass
class Allocation:
    plan: Plan  # every choice decided
    record: dict  # for the manifest: strategy, budgets, per-layer candidates and choices
    predicted: dict[str, float] = field(default_factory=dict)  # metric -> total, base units


def choosing(plan: Plan) -> list[str]:
    return [name for name, p in plan.layers.items() if p.candidates]


def allocate_plan(
    state: State,
    limits: Sequence[ir.Limit],
    costs: CostModel,
    log: Callable[[str], None],
    sensitivity: Sensitivity | None = None,
    latency_batch: Batch | None = None,
) -> tuple[Allocation, Sensitivity]:
    """Decide every choosing layer of `state.plan` under `limits`, with the bytes and times
    `costs` gives for the target. A `sensitivity` measured earlier (for the same plan) is
    reused, as sweeps do."""
    spec, plan = state.spec, state.plan
    names = choosing(plan)
    strategy = spec.allocate.strategy.text if spec.allocate else "ilp"
    how = spec.allocate.sensitivity.text if spec.allocate and spec.allocate.sensitivity else None
    metrics: set[str] = {limit.metric for limit in limits}
    timed = sensitivity is not None and all(
        "latency" in option.costs for options in sensitivity.options.values() for option in options
    )
    if sensitivity is None or ("latency" in metrics and not timed):
        batch = latency_batch if "latency" in metrics else None
        shapes = layer_inputs(state.graph, names, batch) if batch is not None else None
        sensitivity = measure(state, how or "output", costs, shapes, log)
        log(f"sensitivity: {sensitivity.seconds:.1f} s")
    units = _tie_groups(spec.ties, names, plan)
    missing = metrics - {"weight_bits"} - sensitivity.fixed.keys()
    if missing:  # measured once per metric, then shared by sweep points and size retries
        sensitivity.fixed.update(_fixed_costs(state, names, missing, costs, latency_batch))
    fixed = sensitivity.fixed
    params = sum(plan.layers[n].layer.params_in_weight for n in names)
    budgets: dict[str, float] = {limit.metric: _bound(limit, fixed, params) for limit in limits}
    layers = [[Candidate(o.error, o.costs) for o in sensitivity.options[name]] for name in names]
    index = {name: i for i, name in enumerate(names)}
    ties = [[index[n] for n in unit] for unit in units if len(unit) > 1]
    start = time.perf_counter()
    try:
        chosen = allocate(layers, budgets, ties)
    except Infeasible as error:
        raise _infeasible(error, limits, names, layers, fixed, params, plan) from None
    solve_seconds = time.perf_counter() - start
    log(f"allocate ilp: {len(names)} layers, solved to optimality in {solve_seconds:.2f} s")
    record: dict = {
        "strategy": strategy,
        "sensitivity": sensitivity.measure,
        "ilp": {
            "optimal": True,
            "objective": float(sum(layers[i][c].error for i, c in enumerate(chosen))),
            "chosen": list(chosen),
        },
    }
    if strategy == "evolution":
        chosen, record["evolution"] = _evolve(state, sensitivity, names, units, budgets, chosen)
    decided = dict(plan.layers)
    for name, choice in zip(names, chosen, strict=True):
        decided[name] = sensitivity.options[name][choice].plan
    spent = [layers[i][c].costs for i, c in enumerate(chosen)]
    totals = {m: fixed[m] + sum(c[m] for c in spent) for m in metrics if m != "weight_bits"}
    totals["weight_bits"] = sum(c["weight_bits"] for c in spent) / params
    record["budgets"] = [
        {"limit": limit_text(limit), "predicted": in_unit(limit, totals[limit.metric])}
        for limit in limits
    ]
    record["layers"] = [
        {
            "name": name,
            "chosen": choice,
            "candidates": [
                {
                    "candidate": option.describe,
                    "error": option.error,
                    "bits": round(
                        option.costs["weight_bits"] / plan.layers[name].layer.params_in_weight, 4
                    ),
                    "bytes": int(option.costs["size"]),
                    "bops": option.costs["bops"],
                    **(
                        {"latency_ms": round(option.costs["latency"] * 1e3, 4)}
                        if "latency" in option.costs
                        else {}
                    ),
                }
                for option in sensitivity.options[name]
            ],
        }
        for name, choice in zip(names, chosen, strict=True)
    ]
    return Allocation(Plan(decided, plan.matches), record, totals), sensitivity


# ---- budgets -------------------------------------------------------------------------------


def _bound(limit: ir.Limit, fixed: dict[str, float], params: int) -> float:
    """The share of a limit the choosing layers may take, in their cost units."""
    if limit.metric == "weight_bits":
        return limit.amount * params
    return limit.amount - fixed[limit.metric]


def _fixed_costs(
    state: State,
    names: Sequence[str],
    metrics: set[str],
    costs: CostModel,
    batch: Batch | None,
) -> dict[str, float]:
    """Every metric's total over what does not choose. Size and latency are measured on an
    artifact emitted with the other layers compressed as planned (rounded to nearest: bytes
    and speed do not depend on the values) and the choosing ones left in float. Without
    latency, the totals are cached by content: a measured time is not a function of its key."""
    cache = state.cache
    if cache is None or "latency" in metrics:
        return _measure_fixed(state, names, metrics, costs, batch)
    target = state.spec.targets[0] if state.spec.targets else None
    parts = (state.plan.layers, list(names), sorted(metrics), target, cost_model(costs))
    key = cache.key(FIXED, *parts)
    fixed = cache.load(FIXED, key, "fixed costs", lambda entry: dict(entry.meta))
    if fixed is None:
        fixed = _measure_fixed(state, names, metrics, costs, batch)
        cache.save(FIXED, key, Entry(fixed))
    return fixed


def _measure_fixed(
    state: State,
    names: Sequence[str],
    metrics: set[str],
    costs: CostModel,
    batch: Batch | None,
) -> dict[str, float]:
    graph, plan = state.graph, state.plan
    fixed: dict[str, float] = {}
    others = {
        name: stand_in(p, graph.module.get_submodule(name))
        for name, p in plan.layers.items()
        if name not in names
    }
    if "bops" in metrics:
        fixed["bops"] = sum(bops(plan.layers[n]) for n in others)
    if not metrics & {"size", "latency"}:
        return fixed
    qmodel = {name: c for name, c in others.items() if c is not None}
    target = state.spec.targets[0] if state.spec.targets else None
    timed = batch if "latency" in metrics else None
    total_bytes, seconds = costs.artifact_costs(graph, qmodel, target, timed)
    float_bytes = sum(float_param_bytes(graph.module.get_submodule(n)) for n in names)
    fixed["size"] = total_bytes - float_bytes
    if seconds is not None:
        fixed["latency"] = seconds
    return fixed


def _tie_groups(ties: Sequence[ir.Tie], names: Sequence[str], plan: Plan) -> list[list[str]]:
    """Choosing layers grouped by the `tie` statements (groups that share a layer merge)."""
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for tie in ties:
        groups: dict[tuple, list[str]] = {}
        for name in names:
            key = tie_key(tie.pattern, name)
            if key is not None:
                groups.setdefault(key, []).append(name)
        for members in groups.values():
            first = members[0]
            for other in members[1:]:
                _same_candidates(tie, plan, first, other)
                parent[root(other)] = root(first)
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(root(name), []).append(name)
    return list(units.values())


def _same_candidates(tie: ir.Tie, plan: Plan, first: str, other: str) -> None:
    mine = [c.describe() for c in plan.layers[first].candidates or ()]
    theirs = [c.describe() for c in plan.layers[other].candidates or ()]
    if mine != theirs:
        raise UserError(
            f"tied layers {first} and {other} choose among different candidates",
            tie.span,
            help="give the tied layers one `weight choose [...]` rule",
            notes=[
                Note(f"{first} chooses here", plan.layers[first].sources["weight"]),
                Note(f"{other} chooses here", plan.layers[other].sources["weight"]),
            ],
        )


def _infeasible(
    error: Infeasible,
    limits: Sequence[ir.Limit],
    names: Sequence[str],
    layers: Sequence[Sequence[Candidate]],
    fixed: dict[str, float],
    params: int,
    plan: Plan,
) -> InfeasibleBudget:
    """The budget that cannot be met, the least it could be, and the layers that hold it up."""
    smallest = smallest_totals(layers, [limit.metric for limit in limits])
    totals = {m: v if m == "weight_bits" else v + fixed[m] for m, v in smallest.items()}
    if "weight_bits" in totals:
        totals["weight_bits"] /= params
    if error.violated is None:
        reachable = ", ".join(
            f"{ir.METRIC_WORDS[lim.metric]} {show(lim, totals[lim.metric])}" for lim in limits
        )
        return InfeasibleBudget(
            "the budgets cannot all be met at once",
            limits[0].span,
            help=f"each alone can (smallest achievable: {reachable}): relax one of them",
        )
    limit = next(lim for lim in limits if lim.metric == error.violated)
    rate = _bound(limit, fixed, params)
    message = (
        f"budget '{limit_text(limit)}' cannot be met: the smallest achievable is "
        f"{show(limit, totals[limit.metric])}"
    )
    if rate <= 0:
        return InfeasibleBudget(
            message,
            limit.span,
            help=f"what does not choose already takes {show(limit, fixed[limit.metric])}",
        )
    per_param = rate / params
    excess = sorted(
        (
            (
                min(c.costs[limit.metric] for c in options)
                - per_param * plan.layers[n].layer.params_in_weight,
                n,
            )
            for n, options in zip(names, layers, strict=True)
        ),
        reverse=True,
    )
    binding = [n for over, n in excess if over > 0]
    shown = ", ".join(binding[:4]) + (f" and {len(binding) - 4} more" if len(binding) > 4 else "")
    return InfeasibleBudget(
        message,
        limit.span,
        help=f"these layers cannot get under it: {shown}; give them cheaper candidates or raise "
        "the budget"
        if binding
        else "raise the budget",
    )


# ---- evolution -----------------------------------------------------------------------------


def _evolve(
    state: State,
    sensitivity: Sensitivity,
    names: Sequence[str],
    units: Sequence[Sequence[str]],
    budgets: dict[str, float],
    chosen: Sequence[int],
) -> tuple[list[int], dict]:
    """EvoPress from the ILP's choice: units are tie groups, fitness end to end on the
    calibration batches, each candidate's compressed weight stitched into one working model.

    The search's best replaces the ILP's choice only if its per-sample gain over it is
    significant (mean > 2 standard errors): a gain within sampling noise on the calibration
    rows is as likely to be a loss on new data, and the ILP's choice is proven optimal for its
    own objective."""
    allocate = state.spec.allocate
    assert allocate is not None
    fitness_name = allocate.fitness.text if allocate.fitness else "cosine"
    unit_costs = [
        [
            {m: sum(sensitivity.options[n][c].costs[m] for n in unit) for m in budgets}
            for c in range(len(sensitivity.options[unit[0]]))
        ]
        for unit in units
    ]
    stitched = Stitched(state)

    def stitch(choice: Sequence[int]) -> None:
        for unit, c in zip(units, choice, strict=True):
            for layer in unit:
                stitched.put(layer, sensitivity.options[layer][c].weight)

    def fitness(choice: Sequence[int], samples: int) -> float:
        stitch(choice)
        if fitness_name == "evaluate":
            return stitched.score()
        return float(stitched.per_sample(fitness_name, samples).mean())

    position = {name: i for i, name in enumerate(names)}
    start = [chosen[position[unit[0]]] for unit in units]
    samples = 1 if fitness_name == "evaluate" else stitched.samples
    result = evolve(
        Problem(unit_costs, budgets),
        start,
        fitness,
        samples=samples,
        generations=int(allocate.generations.value) if allocate.generations else 20,
        offspring=int(allocate.offspring.value) if allocate.offspring else 8,
        seed=int(allocate.seed.value) if allocate.seed else 0,
    )
    record = {
        "fitness": fitness_name,
        "start_fitness": result.start_fitness,
        "best_fitness": result.fitness,
        "history": result.history,
        "evaluations": result.evaluations,
    }
    best = result.choice
    if best != start and fitness_name != "evaluate":
        stitch(start)
        before = stitched.per_sample(fitness_name, samples)
        stitch(best)
        gain = stitched.per_sample(fitness_name, samples) - before
        error = float(gain.std(ddof=1) / np.sqrt(len(gain)))
        record["gain"] = {"mean": float(gain.mean()), "standard_error": error}
        if gain.mean() <= 2 * error:
            best = start
    record["accepted"] = best != start
    decided = list(chosen)
    for unit, choice in zip(units, best, strict=True):
        for name in unit:
            decided[position[name]] = choice
    return decided, record
