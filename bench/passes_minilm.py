"""Ablation of qspec's passes on all-MiniLM-L6-v2 (and bias correction on the digits CNN),
every number measured through the ONNX artifact by `qspec compile`'s own verification.

Run: .venv/bin/python bench/passes_minilm.py [--only NAME ...]
Writes bench/results/passes_minilm.md. Each row is one `qspec compile` in a fresh process,
timed, with its peak memory (max RSS).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
BUILD = ROOT / "bench" / "build" / "passes"
RESULTS = ROOT / "bench" / "results" / "passes_minilm.md"
LINEARS = '"bert.encoder.layer.*.{attention,intermediate,output}.*"'
FFN = '"bert.encoder.layer.*.{intermediate,output}.dense"'
COMMON = ROOT / "examples" / "minilm" / "common.qspec"
DIGITS = ROOT / "examples" / "digits_cnn"


def minilm(weight: str, extra: str = "", ffn: str = "") -> str:
    body = f"layer {LINEARS} {{\n  {weight}\n{extra}}}\n" if weight else ""
    if ffn:
        body += f"layer {FFN} {{\n  {ffn}\n}}\n"
    return f'qspec 1\ninclude "{COMMON}"\n{body}'


def eora(rank: int) -> str:
    return f"  compensate lora rank {rank} by eora\n"


def rows() -> list[tuple[str, str, str]]:
    """(group, label, spec text)"""
    table = []
    for bits in (4, 3):
        fmt = f"weight int{bits} group 32 asymmetric"
        table += [
            (f"int{bits} g32", "RTN", minilm(fmt)),
            (f"int{bits} g32", "GPTQ", minilm(f"{fmt} round gptq")),
            (f"int{bits} g32", "GPTQ + clip search", minilm(f"{fmt} round gptq search clip")),
            (f"int{bits} g32", "GPTQ + EoRA r16", minilm(f"{fmt} round gptq", eora(16))),
            (f"int{bits} g32", "GPTQ + EoRA r32", minilm(f"{fmt} round gptq", eora(32))),
        ]
    for method in ("magnitude", "wanda", "sparsegpt"):
        sparse = f"sparsity 2:4 by {method}"
        int4 = "weight int4 group 32 asymmetric round gptq"
        table += [
            ("2:4 FFN", f"{method}", minilm("", ffn=sparse)),
            ("2:4 FFN", f"{method} + int4 GPTQ", minilm(int4, ffn=sparse)),
            ("2:4 FFN", f"{method} + int4 GPTQ + EoRA r32", minilm(int4, eora(32), ffn=sparse)),
        ]
    table += [
        ("fp4 g32", "e2m1 fixed", minilm("weight fp4_e2m1 group 32")),
        (
            "fp4 g32",
            "format + clip searched",
            minilm("weight fp4_e2m1 group 32 search format clip"),
        ),
    ]
    return table


def digits(bias: bool) -> str:
    compensate = "  compensate bias\n" if bias else ""
    return (
        f'qspec 1\nmodel "{DIGITS / "model.py"}:load"\n'
        f'calibration "{DIGITS / "digits.npz"}" samples 256 holdout 200\n'
        f"defaults {{\n  weight int4 channel asymmetric\n{compensate}}}\n"
        'layer "conv1" {\n  keep\n}\n'
    )


def compile_row(name: str, text: str) -> dict:
    spec = BUILD / f"{name}.qspec"
    spec.write_text(text)
    out = BUILD / name
    start = time.perf_counter()
    run = subprocess.run(
        [
            "/usr/bin/time",
            "-f",
            "maxrss %M",
            sys.executable,
            "-m",
            "qspec",
            "compile",
            str(spec),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-2000:]}")
    rss = int(re.search(r"maxrss (\d+)", run.stderr).group(1)) / 1024
    report = json.loads((out / "report.json").read_text())
    return {"fidelity": report["fidelity"], "totals": report["totals"], "s": seconds, "mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="labels (substring match) to run")
    args = parser.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    lines = [
        "| group | variant | mean cosine | min cosine | 1 - cosine | MB | compile s | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, (group, label, text) in enumerate(rows()):
        if args.only and not any(word in f"{group} {label}" for word in args.only):
            continue
        result = compile_row(f"row{index:02d}", text)
        fidelity = result["fidelity"]
        lines.append(
            f"| {group} | {label} | {fidelity['cosine_mean']:.5f} | {fidelity['cosine_min']:.5f} "
            f"| {1 - fidelity['cosine_mean']:.5f} | {result['totals']['artifact_bytes'] / 1e6:.2f} "
            f"| {result['s']:.0f} | {result['mb']:.0f} |"
        )
        print(lines[-1], flush=True)
    digit_lines = ["| variant | top-1 agreement | accuracy | float accuracy |", "|---|---|---|---|"]
    for bias in (False, True):
        fidelity = compile_row(f"digits_bias{int(bias)}", digits(bias))["fidelity"]
        label = "int4 channel + bias correction" if bias else "int4 channel"
        digit_lines.append(
            f"| {label} | {fidelity['top1_agreement']:.4f} | {fidelity['accuracy_artifact']:.4f} "
            f"| {fidelity['accuracy_float']:.4f} |"
        )
        print(digit_lines[-1], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        "# Pass ablation on all-MiniLM-L6-v2\n\n"
        "Command: `.venv/bin/python bench/passes_minilm.py`. Each row is a `qspec compile` of "
        "the spec it describes (all Linears of the encoder unless the group says FFN); cosine "
        "of the ONNX artifact's sentence embeddings (run by ONNX Runtime) to the float model's, "
        "on the 32 held-out sentences of `examples/minilm/common.qspec`.\n\n"
        + "\n".join(lines)
        + "\n\n## Bias correction on the digits CNN (200 held-out digits)\n\n"
        + "\n".join(digit_lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
