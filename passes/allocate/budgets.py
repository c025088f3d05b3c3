"""Budgets: what each limit of a spec measures, and whether a build meets it.

- `weight bits`: the average over the layers that choose (all quantized layers when none does)
  of the bits their codes and low-rank factors take per weight; scales and zero points count in
  `size`, not here, so int4 group 32 is 4.0 as papers quote it.
- `size`: the artifact's bytes, measured on the file.
- `bops`: Σ over compressible layers of MACs x density x weight bits x activation bits (32 for
  float), plus the low-rank branch's MACs at its factors' width.
- `latency`: the artifact's median time on the largest held-out batch, on the target the limit
  names (else the first).

Size, weight bits and BOPs are exact (`EXACT`), so a build over them fails; latency is measured
and varies from run to run, so a build over it is reported, not failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from qspec.compiler.qmodel import factor_bytes
from qspec.compiler.resolve import LayerPlan
from qspec.dsl import ir
from qspec.dsl.formats import weight_format

if TYPE_CHECKING:
    from qspec.compiler.state import State
    from qspec.passes.allocate import Allocation

FLOAT_BITS = 32
EXACT = ("weight_bits", "size", "bops")
SIZE_ATTEMPTS = 3  # allocations tried when the emitted file overshoots the predicted size
BASE_UNIT = {"weight_bits": "", "size": "B", "bops": "", "latency": "s"}


def weight_bits(plan: LayerPlan) -> float:
    """Bits of the layer's codes and low-rank factors (32 per weight when float)."""
    layer = plan.layer
    bits = (plan.weight.bits if plan.weight else FLOAT_BITS) * layer.params_in_weight
    if plan.lowrank is not None and plan.weight is not None:
        rank, factors = plan.lowrank.rank, plan.lowrank.factors
        bits += 8 * factor_bytes(layer.rows, layer.cols, rank, factors)
    return float(bits)


def bops(plan: LayerPlan) -> float:
    layer = plan.layer
    activation = _activation_bits(plan)
    bits = plan.weight.bits if plan.weight else FLOAT_BITS
    density = plan.sparsity.density if plan.sparsity else 1.0
    total = layer.macs * density * bits * activation
    if plan.lowrank is not None and plan.weight is not None:
        tokens = layer.macs / layer.params_in_weight
        width = 16 if plan.lowrank.factors == "fp16" else 8
        total += tokens * plan.lowrank.rank * (layer.rows + layer.cols) * width * activation
    return float(total)


def _activation_bits(plan: LayerPlan) -> int:
    if plan.activation is None:
        return FLOAT_BITS
    fmt = weight_format(plan.activation.format)
    return fmt.bits if fmt else 8


# ---- limits --------------------------------------------------------------------------------


def limit_text(limit: ir.Limit) -> str:
    unit = f" {limit.unit.text}" if limit.unit else ""
    return f"{ir.METRIC_WORDS[limit.metric]} <= {limit.value.value:g}{unit}"


def in_unit(limit: ir.Limit, total: float) -> float:
    """A total (base units) in the unit the limit is written in."""
    if limit.metric == "weight_bits" or limit.unit is None:
        return round(total, 4)
    return round(total / ir.UNITS[limit.metric][limit.unit.text], 6)


def show(limit: ir.Limit, total: float) -> str:
    unit = limit.unit.text if limit.unit else BASE_UNIT[limit.metric]
    return f"{in_unit(limit, total):g}{' ' + unit if unit else ''}"


def size_excess(limits: Sequence[ir.Limit], total_bytes: int) -> int:
    """Bytes the artifact is over the size budget (0 when under or when there is none)."""
    return max((int(total_bytes - lim.amount) for lim in limits if lim.metric == "size"), default=0)


def tightened(limit: ir.Limit, reserve: int) -> ir.Limit:
    """A size limit lowered by `reserve` bytes (other limits unchanged)."""
    if limit.metric != "size":
        return limit
    scale = ir.UNITS["size"][limit.unit.text] if limit.unit else 1.0
    return replace(limit, value=ir.Num((limit.amount - reserve) / scale, limit.value.span))


def check_budgets(
    limits: Sequence[ir.Limit],
    state: State,
    artifact_bytes: int,
    latency_seconds: dict[str, float | None],
    allocation: Allocation | None,
) -> list[dict]:
    """Each limit with what the build measured (and the allocator predicted), and whether it is
    met. Latency is that of the target the limit names (else the first); a target that was
    compiled but could not run here (CUDA without a GPU) leaves its latency unmeasured."""
    plans = state.plan.layers.values()
    chosen = {e["name"] for e in allocation.record["layers"]} if allocation else set()
    population = [p for p in plans if p.layer.name in chosen or (not chosen and p.weight)]
    params = sum(p.layer.params_in_weight for p in population)
    measured = {
        "weight_bits": sum(weight_bits(p) for p in population) / max(params, 1),
        "size": float(artifact_bytes),
        "bops": sum(bops(p) for p in plans),
    }
    predicted = (
        {b["limit"]: b["predicted"] for b in allocation.record["budgets"]} if allocation else {}
    )
    entries = []
    first = next(iter(latency_seconds))
    for limit in limits:
        entry: dict[str, object] = {"limit": limit_text(limit), "metric": limit.metric}
        if entry["limit"] in predicted:
            entry["predicted"] = predicted[entry["limit"]]
        if limit.metric == "latency":
            value = latency_seconds[limit.target.text if limit.target else first]
            if value is None:
                entries.append(entry | {"measured": None, "met": False, "note": "not run here"})
                continue
        else:
            value = measured[limit.metric]
        entry["measured"] = in_unit(limit, value)
        entry["met"] = bool(value <= limit.amount * (1 + 1e-9))
        entries.append(entry)
    return entries
