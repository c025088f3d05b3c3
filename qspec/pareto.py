"""`qspec sweep`: compile one spec at several values of one budget, for a Pareto curve.

The model, calibration, capture and the candidates' sensitivity are prepared once; each point
only allocates, runs the passes and emits. Every point gets its own build folder under DIR, and
DIR/sweep.md, sweep.json and sweep.png (fidelity against artifact bytes) are rewritten after each
point, atomically, so an interrupted sweep keeps the points it finished.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qspec.compiler.errors import CompileFailure, InfeasibleBudget, UserError
from qspec.compiler.folder import check_replaceable, check_writable, output_folder
from qspec.driver import compile_prepared, prepare
from qspec.dsl import ir
from qspec.dsl.diagnostics import SpecError
from qspec.dsl.load import check_file
from qspec.passes.allocate.budgets import limit_text

METRICS: dict[str, ir.Metric] = {text: metric for metric, text in ir.METRIC_WORDS.items()}
RANGE = re.compile(
    r"^\s*(?P<metric>[a-z ]+?)\s*=\s*(?:(?P<low>[0-9.eE+-]+)\s*\.\.\s*(?P<high>[0-9.eE+-]+)"
    r"\s+step\s+(?P<step>[0-9.eE+-]+)|(?P<values>[0-9.eE+-]+(?:\s*,\s*[0-9.eE+-]+)*))"
    r"\s*(?P<unit>[A-Za-z]+)?\s*$"
)
FORM = '"METRIC=LOW..HIGH step STEP [UNIT]" or "METRIC=V1,V2,... [UNIT]"'
MAX_POINTS = 200  # each point is a whole compile; more is a typo in the step


@dataclass(frozen=True)
class Points:
    metric: ir.Metric
    values: tuple[float, ...]
    unit: str | None


def parse_budget(text: str) -> Points:
    """`weight bits=2.5..6 step 0.5`, `size=8..16 step 2 MB`, `latency=20,30 ms`."""
    match = RANGE.match(text)
    if match is None:
        raise UserError(f"--budget expects {FORM}, got '{text}'")
    metric = METRICS.get(match["metric"].strip())
    if metric is None:
        raise UserError(
            f"--budget: '{match['metric'].strip()}' is not a budget",
            help="one of: " + ", ".join(METRICS),
        )
    unit = match["unit"]
    units = ir.UNITS[metric]
    if unit is not None and unit not in units:
        raise UserError(
            f"--budget: '{unit}' is not a {ir.METRIC_WORDS[metric]} unit ({', '.join(units)})"
        )
    if unit is None and metric in ("size", "latency"):
        raise UserError(
            f"--budget: a {ir.METRIC_WORDS[metric]} sweep needs a unit ({', '.join(units)})"
        )
    try:
        if match["values"]:
            values = tuple(float(v) for v in match["values"].split(","))
        else:
            low, high, step = (float(match[k]) for k in ("low", "high", "step"))
            if not all(map(math.isfinite, (low, high, step))) or step <= 0 or high < low:
                raise ValueError
            count = math.floor((high - low) / step + 0.5) + 1  # before allocating any of them
            if count > MAX_POINTS:
                raise UserError(
                    f"--budget: {low:g}..{high:g} step {step:g} is {count:,} points; "
                    f"a sweep has at most {MAX_POINTS}",
                    help="take a larger step (each point is a whole compile)",
                )
            values = tuple(np.round(np.arange(low, high + step / 2, step), 6).tolist())
    except ValueError:
        raise UserError(f"--budget expects {FORM} with LOW <= HIGH and STEP > 0") from None
    if len(values) > MAX_POINTS:
        raise UserError(f"--budget: {len(values)} values; a sweep has at most {MAX_POINTS}")
    if not values or min(values) <= 0 or not all(map(math.isfinite, values)):
        raise UserError("--budget values must be positive and finite")
    if metric == "weight_bits" and max(values) > 32:
        raise UserError("--budget: average weight bits cannot exceed 32")
    return Points(metric, values, unit)


def sweep_spec(
    spec_path: str | Path, budget: str, out_dir: str | Path, log: Callable[[str], None]
) -> list[dict]:
    points = parse_budget(budget)
    checked = check_file(spec_path)
    spec = checked.raise_errors()
    rows: list[dict] = []
    try:
        out = output_folder(out_dir)
        check_replaceable(out, [Path(path) for path in spec.files], _is_sweep)
        check_writable(out)
        prepared = prepare(spec, log)
        for value in points.values:
            limit = ir.Limit(
                points.metric,
                ir.Num(value),
                ir.Word(points.unit) if points.unit else None,
                span=ir.Span(spec.path, 0, 0, 0, 0),
            )
            limits = [lim for lim in spec.limits if lim.metric != points.metric] + [limit]
            folder = out / _folder_name(limit)
            log(f"sweep: {limit_text(limit)} -> {folder}")
            rows.append(_point(prepared, limit, limits, folder, log))
            _write(out, rows, points)
    except UserError as error:
        raise SpecError([error.diagnostic], checked.sources) from error
    return rows


def _point(prepared, limit: ir.Limit, limits, folder: Path, log) -> dict:
    row: dict = {"budget": limit_text(limit), "value": limit.value.value, "folder": folder.name}
    try:
        result = compile_prepared(prepared, folder, limits, {}, log)
    except InfeasibleBudget as error:
        return {**row, "status": error.diagnostic.message}
    except CompileFailure as failure:
        return {**row, "status": str(failure)}
    totals = result.manifest["totals"]
    scores = ("cosine_mean", "cosine_min", "snr_db", "top1_agreement")  # None: no target ran here
    measured = {b["limit"]: b["measured"] for b in result.manifest.get("budgets", [])}
    return {
        **row,
        "status": "ok",
        "measured": measured.get(limit_text(limit)),
        "artifact_bytes": totals["artifact_bytes"],
        **{score: getattr(result.fidelity, score, None) for score in scores},
        "latency_ms": next(iter(result.latency_ms.values())),
    }


def _is_sweep(folder: Path) -> bool:
    """A folder an earlier sweep wrote: it holds sweep.json."""
    return (folder / "sweep.json").is_file()


def _folder_name(limit: ir.Limit) -> str:
    unit = limit.unit.text if limit.unit else ""
    return f"{ir.METRIC_WORDS[limit.metric].replace(' ', '-')}-{limit.value.value:g}{unit}"


def _write(out: Path, rows: list[dict], points: Points) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "sweep.json", json.dumps(rows, indent=2) + "\n")
    _atomic(out / "sweep.md", _table(rows))
    _plot(out / "sweep.png", rows, points)


def _table(rows: list[dict]) -> str:
    lines = [
        "| budget | measured | artifact bytes | cosine mean | cosine min | SNR dB | latency ms |"
        " status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['budget']} | - | - | - | - | - | - | {row['status']} |")
            continue
        lines.append(
            f"| {row['budget']} | {row['measured']} | {row['artifact_bytes']:,} "
            f"| {row['cosine_mean']:.5f} | {row['cosine_min']:.5f} | {row['snr_db']:.1f} "
            f"| {row['latency_ms']:.2f} | ok |"
        )
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict], points: Points) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    done = [row for row in rows if row["status"] == "ok"]
    figure, axes = pyplot.subplots(figsize=(6.4, 4.2))
    sizes = [row["artifact_bytes"] / 1e6 for row in done]
    axes.plot(sizes, [row["cosine_mean"] for row in done], "o-")
    for row, size in zip(done, sizes, strict=True):
        axes.annotate(
            f"{row['value']:g}",
            (size, row["cosine_mean"]),
            fontsize=8,
            textcoords="offset points",
            xytext=(4, -10),
        )
    axes.set_xlabel("artifact MB")
    axes.set_ylabel("held-out cosine to the float model")
    unit = f" ({points.unit})" if points.unit else ""
    axes.set_title(f"{ir.METRIC_WORDS[points.metric]} sweep{unit}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=100)
    pyplot.close(figure)
    os.replace(staging, path)


def _atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)
