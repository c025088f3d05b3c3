"""Mixed precision on all-MiniLM-L6-v2: the ILP's mix against uniform GPTQ at equal average bits,
evolution against the ILP, the Pareto curve of a bits sweep, and the ILP's solve time at scale.

Run: .venv/bin/python bench/allocate_minilm.py [--skip-sweep]
Writes bench/results/allocate_minilm.md (and allocate_minilm_sweep.png). Every fidelity number is
the held-out cosine of the ONNX artifact (run by ONNX Runtime) to the float model, measured by
`qspec compile`'s own verification, one compile per row in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qspec.passes.allocate.ilp import Candidate, allocate

ROOT = Path(__file__).parents[1]
BUILD = ROOT / "bench" / "build" / "allocate"
RESULTS = ROOT / "bench" / "results" / "allocate_minilm.md"
COMMON = ROOT / "examples" / "minilm" / "common.qspec"
LINEARS = '"bert.encoder.layer.*.{attention,intermediate,output}.*"'
CANDIDATES = {
    4.0: "int3 group 32 asymmetric, int4 group 32 asymmetric, int8 channel, fp8_e4m3 channel",
    3.0: "int2 group 32 asymmetric, int3 group 32 asymmetric, int4 group 32 asymmetric, "
    "int8 channel",
}


def uniform(bits: int) -> str:
    weight = f"weight int{bits} group 32 asymmetric round gptq"
    return f'qspec 1\ninclude "{COMMON}"\nlayer {LINEARS} {{\n  {weight}\n}}\n'


def mixed(bits: float, allocate_line: str) -> str:
    return (
        f'qspec 1\ninclude "{COMMON}"\nlayer {LINEARS} {{\n'
        f"  weight choose [{CANDIDATES[bits]}] round gptq\n}}\n"
        f"budget {{\n  weight bits <= {bits}\n}}\n{allocate_line}\n"
    )


def rows() -> list[tuple[str, str, str]]:
    """(label, name, spec text)"""
    table = []
    for bits in (4.0, 3.0):
        table.append(
            (f"uniform int{int(bits)} g32 GPTQ", f"uniform{int(bits)}", uniform(int(bits)))
        )
        for how in ("output", "hessian", "metric"):
            line = f"allocate ilp sensitivity {how}"
            table.append((f"ILP, sensitivity {how}", f"ilp_{how}{int(bits)}", mixed(bits, line)))
        line = (
            "allocate evolution generations 16 offspring 8 seed 0 fitness cosine sensitivity metric"
        )
        table.append(("evolution from ILP (metric)", f"evolution{int(bits)}", mixed(bits, line)))
    return table


def compile_spec(name: str, text: str) -> dict:
    spec = BUILD / f"{name}.qspec"
    spec.write_text(text)
    out = BUILD / name
    start = time.perf_counter()
    command = [sys.executable, "-m", "qspec", "compile", str(spec), "-o", str(out)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    return {"manifest": manifest, "report": report, "seconds": time.perf_counter() - start}


def bits_of(manifest: dict) -> float:
    layers = [e for e in manifest["layers"] if e["format"] != "float"]
    params = sum(e["params"] - e["shape"][0] for e in layers)  # weights, not biases
    return sum(e["weight_bits"] * (e["params"] - e["shape"][0]) for e in layers) / params


def solve_time(layers: int = 2000, candidates: int = 6, seed: int = 0) -> tuple[float, int]:
    """Seconds to solve a random instance to optimality (bits, bytes, latency budgets)."""
    rng = np.random.default_rng(seed)
    table = []
    for _ in range(layers):
        params = int(rng.integers(10_000, 5_000_000))
        bits = np.sort(rng.choice([2, 3, 4, 5, 6, 8], candidates, replace=False))
        error = np.sort(rng.random(candidates))[::-1] * params
        table.append(
            [
                Candidate(
                    float(e),
                    {"bits": b * params, "bytes": b * params / 8 * 1.06, "ms": b * params * 1e-9},
                )
                for b, e in zip(bits, error, strict=True)
            ]
        )
    totals = {
        k: sum(np.mean([c.costs[k] for c in options]) for options in table)
        for k in ("bits", "bytes", "ms")
    }
    budgets = {"bits": totals["bits"] * 0.8, "bytes": totals["bytes"] * 0.85, "ms": totals["ms"]}
    start = time.perf_counter()
    allocate(table, budgets)
    return time.perf_counter() - start, layers * candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    lines = [
        "| budget | variant | weight bits | MB | held-out cosine | min cosine | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name, text in rows():
        result = compile_spec(name, text)
        fidelity, totals = result["report"]["fidelity"], result["manifest"]["totals"]
        bits = "4.0" if name.endswith("4") else "3.0"
        evolution = result["manifest"].get("allocation", {}).get("evolution")
        if evolution:
            label += (
                f" (calibration cosine {evolution['start_fitness']:.5f} -> "
                f"{evolution['best_fitness']:.5f})"
            )
        lines.append(
            f"| {bits} | {label} | {bits_of(result['manifest']):.3f} "
            f"| {totals['artifact_bytes'] / 1e6:.2f} | {fidelity['cosine_mean']:.5f} "
            f"| {fidelity['cosine_min']:.5f} | {result['seconds']:.0f} |"
        )
        print(lines[-1], flush=True)
    seconds, variables = solve_time()
    solve = f"2,000 layers x 6 candidates x 3 budgets ({variables:,} binaries): {seconds:.2f} s"
    print(solve, flush=True)
    sweep = ""
    if not args.skip_sweep:
        spec = BUILD / "sweep.qspec"
        spec.write_text(mixed(3.0, "allocate ilp sensitivity metric"))
        out = BUILD / "sweep"
        command = [
            sys.executable,
            "-m",
            "qspec",
            "sweep",
            str(spec),
            "--budget",
            "weight bits=2.5..6 step 0.5",
            "-o",
            str(out),
        ]
        subprocess.run(command, check=True, capture_output=True)
        shutil.copy(out / "sweep.png", RESULTS.with_name("allocate_minilm_sweep.png"))
        sweep = (
            "\n## Pareto curve: `qspec sweep` over weight bits 2.5..6 (candidates int2/int3/int4 "
            "g32 GPTQ, int8 channel; sensitivity metric)\n\n"
            + (out / "sweep.md").read_text()
            + "\n![sweep](allocate_minilm_sweep.png)\n"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        "# Mixed-precision allocation on all-MiniLM-L6-v2\n\n"
        "Command: `.venv/bin/python bench/allocate_minilm.py`. Every row compiles the encoder's "
        "36 Linears; the uniform rows with one GPTQ format, the others with `weight choose "
        f"[...] round gptq` over the candidates below and `weight bits <= B`. Cosine: the ONNX "
        "artifact's sentence embeddings against the float model's on the 32 held-out "
        "sentences. Compile seconds include each row's own sensitivity measurement and were taken "
        "while other jobs shared the 2 cores.\n\n"
        f"- 4.0 bits: choose among {CANDIDATES[4.0]}\n"
        f"- 3.0 bits: choose among {CANDIDATES[3.0]}\n\n"
        + "\n".join(lines)
        + f"\n\n## ILP solve time\n\n{solve}\n"
        + sweep
    )


if __name__ == "__main__":
    main()
