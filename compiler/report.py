"""Per-layer manifest entries and the report (report.json for machines, report.md for people)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qspec.compiler.capture import Graph
from qspec.compiler.lowrank import factor_bytes
from qspec.compiler.numerics import nbytes
from qspec.compiler.pipeline import State
from qspec.compiler.qmodel import quant_spec
from qspec.compiler.verify import Fidelity

EMITTED_NOTES = {
    "decode": "no ONNX Runtime kernel for this format: the packed codes are decoded in the graph "
    "(bit operations, codebook, scales) and folded to float when the session loads",
}


def float_param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters(recurse=False))


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
            "format": plan.weight.format if plan.weight else "float",
            "granularity": plan.weight.granularity if plan.weight else None,
            "group": plan.weight.group_size if plan.weight else None,
            "bits": plan.weight.bits if plan.weight else 32,
            "symmetric": plan.weight.symmetric if plan.weight else None,
            "scale_format": plan.weight.scale_format if plan.weight else None,
            "rounding": plan.weight.rounding if plan.weight else None,
            "activation": plan.activation.describe() if plan.activation else None,
            "sparsity": plan.sparsity.describe() if plan.sparsity else None,
            "density": None,
            "rank": plan.lowrank.rank if plan.lowrank else None,
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
                minimum += nbytes(quant_spec(plan.weight), (layer.rows, layer.cols))["total"]
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
            if emitted.startswith("decode"):
                entry["notes"] = [EMITTED_NOTES["decode"]]
            if compressed.notes:
                entry.setdefault("notes", []).extend(compressed.notes)
        entries.append(entry)
    return entries


def build(
    manifest: dict, fidelity: Fidelity, layer_errors: dict[str, dict], method: str, note: str
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
                "relative_error": error.get("relative_error"),
                "snr_db": error.get("snr_db"),
                "decided_by": entry["decided_by"],
            }
        )
    return {
        "spec": manifest["spec"]["path"],
        "capture": {"method": method, "note": note},
        "fidelity": fidelity.as_dict(),
        "totals": manifest["totals"],
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


def markdown(report: dict) -> str:
    fidelity, totals = report["fidelity"], report["totals"]
    lines = [
        f"# qspec build of {Path(report['spec']).name}",
        "",
        f"Captured with torch.{report['capture']['method']}.",
        "",
        "## Fidelity on held-out samples (artifact run by ONNX Runtime vs float PyTorch)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in fidelity.items() if value is not None),
        "",
        "## Size",
        "",
        "| | bytes |",
        "|---|---|",
        f"| artifact | {totals['artifact_bytes']:,} |",
        f"| float model | {totals['float_bytes']:,} |",
        f"| theoretical minimum | {totals['min_bytes']:,} |",
        f"| artifact / minimum | {totals['artifact_to_min']} |",
        "",
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
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"
