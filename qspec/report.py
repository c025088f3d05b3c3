"""Per-layer manifest entries and the report (report.json for machines, report.md for people)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qspec.compiler.capture import Graph
from qspec.compiler.numerics import nbytes
from qspec.compiler.qmodel import factor_bytes, float_param_bytes
from qspec.compiler.resolve import WeightPlan
from qspec.compiler.state import State
from qspec.passes.allocate.budgets import weight_bits
from qspec.verify import Fidelity

EMITTED_NOTES = {
    "decode": "no ONNX Runtime kernel for this format: the packed codes are decoded in the graph "
    "(bit operations, codebook, scales) and folded to float when the session loads",
}


def layer_entries(graph: Graph, state: State, artifact) -> list[dict]:
    entries = []
    for name, layer in graph.layers.items():
        plan = state.plan.layers[name]
        compressed = state.qmodel.get(name)
        module = graph.module.get_submodule(name)
        entry: dict = {
            "name": name,
            "kind": layer.kind,
            "shape": list(layer.weight_shape),
            "params": layer.params,
            **_weight_fields(plan.weight),
            "activation": plan.activation.describe() if plan.activation else None,
            "sparsity": plan.sparsity.describe() if plan.sparsity else None,
            "density": None,
            "rank": plan.lowrank.rank if plan.lowrank else None,
            "weight_bits": round(weight_bits(plan) / layer.params_in_weight, 4),
            "decided_by": sorted(
                {f"{Path(s.file).name}:{s.line}" for s in plan.sources.values() if s.line}
            ),
        }
        if compressed is None:
            entry.update(
                emitted="float",
                bytes=float_param_bytes(module),
                min_bytes=float_param_bytes(module),
            )
        else:
            minimum = 0
            if compressed.weight is not None and plan.weight is not None:
                minimum += nbytes(plan.weight.quantizer, (layer.rows, layer.cols))["total"]
            if compressed.lowrank is not None and plan.lowrank is not None:
                rank = compressed.lowrank[1].shape[0]
                minimum += factor_bytes(layer.rows, layer.cols, rank, plan.lowrank.factors)
            if compressed.bias is not None:
                minimum += compressed.bias.size * 4
            emitted = artifact.emitted[name]
            entry.update(
                density=round(compressed.density, 4),
                emitted=emitted,
                bytes=artifact.layer_bytes[name],
                min_bytes=minimum,
            )
            if emitted.startswith("decode+"):  # the ONNX in-graph decode (not a TVM kernel)
                entry["notes"] = [EMITTED_NOTES["decode"]]
            if compressed.notes:
                entry.setdefault("notes", []).extend(compressed.notes)
        entries.append(entry)
    return entries


def _weight_fields(weight: WeightPlan | None) -> dict:
    """The manifest's weight fields, in the manifest's order."""
    if weight is None:
        fields = ("format", "granularity", "group", "bits", "symmetric", "scale_format")
        return dict.fromkeys(fields) | {"format": "float", "bits": 32, "rounding": None}
    quantizer = weight.quantizer
    return {
        "format": quantizer.format.name,
        "granularity": quantizer.granularity,
        "group": quantizer.group_size,
        "bits": weight.bits,
        "symmetric": quantizer.symmetric,
        "scale_format": quantizer.scale_format,
        "rounding": weight.rounding,
    }


def assemble(
    manifest: dict,
    fidelity: Fidelity | None,
    layer_errors: dict[str, dict],
    method: str,
    note: str,
) -> dict:
    layers = []
    for entry in manifest["layers"]:
        error = layer_errors.get(entry["name"], {})
        layers.append(
            {
                "name": entry["name"],
                "kind": entry["kind"],
                "shape": entry["shape"],
                "format": _describe(entry),
                "sparsity": entry["sparsity"],
                "rank": entry["rank"],
                "bytes": entry["bytes"],
                "weight_bits": entry["weight_bits"],
                "choice": entry.get("choice"),
                "relative_error": error.get("relative_error"),
                "snr_db": error.get("snr_db"),
                "decided_by": entry["decided_by"],
            }
        )
    allocation = manifest.get("allocation")
    return {
        "spec": manifest["spec"]["path"],
        "capture": {
            "method": method,
            "note": note,
            "inputs": {name: i["shape"] for name, i in manifest["model"]["inputs"].items()},
            "folded": manifest["model"]["folded"],
            "unfolded": manifest["model"]["unfolded"],
            "rewritten": manifest["model"]["rewritten"],
            "left_float": manifest["model"]["left_float"],
        },
        "fidelity": fidelity and fidelity.as_dict(),
        "targets": [
            {k: t[k] for k in ("name", "backend", "device", "file", "bytes", "verified") if k in t}
            | ({"fidelity": t["fidelity"]} if t.get("verified") else {"skipped": t.get("skipped")})
            for t in manifest["targets"]
        ],
        "totals": manifest["totals"],
        "budgets": manifest.get("budgets", []),
        "allocation": allocation
        and {k: v for k, v in allocation.items() if k not in ("layers", "budgets")},
        "layers": layers,
    }


def _describe(entry: dict) -> str:
    if entry["format"] == "float":
        return "float"
    grain = f"g{entry['group']}" if entry["granularity"] == "group" else entry["granularity"]
    text = f"{entry['format']} {grain} {'sym' if entry['symmetric'] else 'asym'}"
    if entry["activation"]:
        text += f", act {entry['activation']}"
    return f"{text} -> {entry.get('emitted', '')}"


def _folding(capture: dict) -> str:
    """Sentences on the input sizes the artifact takes, the BatchNorms folded into their
    layers, the modules rewritten into plain layers, and the weights left in float."""
    shapes = ", ".join(
        f"{name} [{', '.join('any' if size is None else str(size) for size in shape)}]"
        for name, shape in capture["inputs"].items()
    )
    folded = [f"{f['batchnorm']} into {f['layer']}" for f in capture["folded"]]
    kept = [f"{u['batchnorm']} ({u['reason']})" for u in capture["unfolded"]]
    text = f" Inputs: {shapes} (a fixed size is one the model runs only at)."
    text += f" BatchNorm folded: {', '.join(folded)}." if folded else ""
    text += f" BatchNorm left in float: {', '.join(kept)}." if kept else ""
    rewritten = [f"{r['module']} into {r['into']}" for r in capture["rewritten"]]
    text += f" Rewritten: {'; '.join(rewritten)}." if rewritten else ""
    left = [f"{f['module']} ({f['reason']})" for f in capture["left_float"]]
    return text + (f" Weights left in float: {'; '.join(left)}." if left else "")


def markdown(report: dict) -> str:
    totals = report["totals"]
    lines = [
        f"# qspec build of {Path(report['spec']).name}",
        "",
        f"Captured with torch.{report['capture']['method']}.{_folding(report['capture'])}",
        "",
        *_fidelity(report["targets"]),
        "## Size",
        "",
        "| | bytes |",
        "|---|---|",
        f"| artifact ({report['targets'][0]['file']}) | {totals['artifact_bytes']:,} |",
        *(
            f"| {t['name']} ({t['file']} and its parameters) | {t['bytes']:,} |"
            for t in report["targets"][1:]
            if t["backend"] == "tvm"
        ),
        f"| float model | {totals['float_bytes']:,} |",
        f"| theoretical minimum | {totals['min_bytes']:,} |",
        f"| artifact / minimum | {totals['artifact_to_min']} |",
        "",
        *_budgets(report),
        "## Layers",
        "",
        "| layer | kind | shape | format | sparsity | rank | bytes | rel. error | decided by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in report["layers"]:
        shape = "x".join(str(d) for d in layer["shape"])
        lines.append(
            f"| {layer['name']} | {layer['kind']} | {shape} | {layer['format']} "
            f"| {layer['sparsity'] or '-'} | {layer['rank'] or '-'} | {layer['bytes']:,} "
            f"| {_fmt(layer['relative_error'])} | {', '.join(layer['decided_by']) or '-'} |"
        )
    lines += _bits_bars(report["layers"])
    return "\n".join(lines) + "\n"


RUNTIMES = {"onnx": "ONNX Runtime", "tvm": "the TVM runtime"}


def _fidelity(targets: list[dict]) -> list[str]:
    """Held-out fidelity of each target's artifact, run by its own runtime, against float."""
    ran = [t for t in targets if t["verified"]]
    lines = ["## Fidelity on held-out samples (each artifact run by its runtime vs float PyTorch)"]
    lines += ["", "| metric | " + " | ".join(f"{t['name']} ({t['device']})" for t in ran) + " |"]
    lines.append("|---|" + "---|" * len(ran))
    metrics = ran[0]["fidelity"] if ran else {}
    for name in metrics:
        values = [t["fidelity"][name] for t in ran]
        if name not in ("outputs", "sources") and any(v is not None for v in values):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in values) + " |")
    for target in ran:
        lines += _per_output(target) + _per_source(target)
    for target in targets:
        if not target["verified"]:
            lines.append(
                f"\n{target['name']} ({target['device']}): compiled, not run: {target['skipped']}."
            )
    runtimes = sorted({RUNTIMES[t["backend"]] for t in ran})
    return [*lines, "", f"Run by {' and '.join(runtimes)}." if runtimes else "", ""]


def _per_output(target: dict) -> list[str]:
    """A model with several outputs: each one's scores (the table above shows the worst)."""
    outputs = target["fidelity"].get("outputs")
    if not outputs:
        return []
    metrics = [k for k in outputs[0] if k != "name"]
    lines = ["", f"Per output, {target['name']} (above: the worst of each):", ""]
    lines += ["| output | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for output in outputs:
        lines.append(f"| {output['name']} | " + " | ".join(str(output[k]) for k in metrics) + " |")
    return lines


SOURCE_METRICS = ("samples", "cosine_mean", "cosine_p1", "cosine_min", "snr_db", "top1_agreement")


def _per_source(target: dict) -> list[str]:
    """Held-out rows from several sources (calibration sources, `verify` sources): each
    one's scores, as each is where some users will run the model."""
    sources = target["fidelity"].get("sources")
    if not sources:
        return []
    metrics = [k for k in SOURCE_METRICS if any(s.get(k) is not None for s in sources)]
    lines = ["", f"Per source, {target['name']} (above: the worst of each):", ""]
    lines += ["| source | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for source in sources:
        values = (str(source.get(k)) for k in metrics)
        lines.append(f"| {source['source']} | " + " | ".join(values) + " |")
    return lines


def _budgets(report: dict) -> list[str]:
    if not report["budgets"]:
        return []
    lines = ["## Budgets", ""]
    allocation = report["allocation"]
    if allocation:
        how = f"allocate {allocation['strategy']}, sensitivity {allocation['sensitivity']}"
        lines += [f"Chosen by {how} (the ILP's choice is proven optimal).", ""]
        evolution = allocation.get("evolution")
        if evolution:
            lines += [
                f"Evolution ({evolution['fitness']}): fitness {evolution['start_fitness']:.6g} "
                f"from the ILP choice, {evolution['best_fitness']:.6g} after "
                f"{len(evolution['history'])} generations.",
                "",
            ]
    lines += ["| budget | predicted | measured | met |", "|---|---|---|---|"]
    for budget in report["budgets"]:
        predicted = budget.get("predicted", "-")
        met = "yes" if budget["met"] else "no"
        lines.append(f"| {budget['limit']} | {predicted} | {budget['measured']} | {met} |")
    return [*lines, ""]


def _bits_bars(layers: list[dict]) -> list[str]:
    """Bits per weight of each layer as a text bar chart (bits.png draws the same)."""
    width = max(len(layer["name"]) for layer in layers)
    lines = ["", "## Bits per layer", "", "![bits per layer](bits.png)", "", "```"]
    for layer in layers:
        bits = layer["weight_bits"]
        bar = "█" * round(min(bits, 16) * 2)
        choice = f"  ({layer['choice']['candidate']})" if layer["choice"] else ""
        lines.append(f"{layer['name'].ljust(width)} {bits:6.2f} {bar}{choice}")
    return [*lines, "```"]


def bits_chart(manifest: dict, path: Path) -> None:
    """bits.png: bits per weight of every layer, chosen layers highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    layers = manifest["layers"]
    figure, axes = pyplot.subplots(figsize=(10, 0.22 * len(layers) + 1.2))
    colors = ["tab:orange" if "choice" in layer else "tab:blue" for layer in layers]
    axes.barh(
        [layer["name"] for layer in layers],
        [layer["weight_bits"] for layer in layers],
        color=colors,
    )
    axes.invert_yaxis()
    axes.set_xlabel("bits per weight (codes and low-rank factors; orange: chosen by allocate)")
    axes.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _fmt(value) -> str:
    return "-" if value is None else f"{float(value):.4g}"


def json_safe(data: Any) -> Any:
    """`data` with every non-finite float as the string "inf", "-inf" or "nan" (what
    float() reads back), so report.json and the manifest are strict JSON: no bare NaN or
    Infinity tokens, which most JSON parsers reject. An SNR of an exact match stays "inf"."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(value) for value in data]
    return data


def number(value: Any) -> float | None:
    """A number read back from report.json or the manifest: a float, "inf"/"-inf"/"nan" as
    floats, None as None."""
    return None if value is None else float(value)
