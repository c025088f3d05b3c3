"""Parse + validate a generated 5,000-rule spec; writes bench/results/parse.md.

Run: .venv/bin/python bench/parse.py [--rules N] [--repeat K]
Target: about one second for 5,000 rules on one core of the reference machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from qspec.dsl.load import check_file
from qspec.dsl.parser import parse_document

RESULTS = Path(__file__).with_name("results") / "parse.md"

SETTINGS = (
    "weight int4 group 32 asymmetric round gptq damp 0.01 actorder",
    "weight fp4 group 32 scale e8m0 search format\n  activation int8 token dynamic",
    "weight int8 channel\n  sparsity 2:4 by sparsegpt\n  compensate lora rank 16 by eora",
    "weight choose [int3 group 32 rank 16 by eora, int4 group 32, int8 channel]",
    "keep",
)


def generate(rules: int) -> str:
    """A spec with `rules` layer rules cycling through realistic settings."""
    lines = [
        "qspec 1",
        'model "model.py:load"',
        'calibration "model.py:batches" samples 128',
        "target onnx { device cpu opset 21 }",
        "defaults {\n  weight int8 channel\n}",
    ]
    for i in range(rules):
        glob, regex = f'"model.layers.{i}.mlp.*"', f're"model\\.layers\\.{i}\\.attn\\..*"'
        pattern = glob if i % 2 else regex
        lines.append(f"# rule {i}\nlayer {pattern} {{\n  {SETTINGS[i % len(SETTINGS)]}\n}}")
    lines.append("budget {\n  weight bits <= 4.5\n  size <= 2 GB\n}\nallocate ilp")
    return "\n".join(lines) + "\n"


def measure(text: str, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.qspec"
        path.write_text(text)
        parse_document("qspec 1\n", "warmup.qspec")  # builds the LALR tables once
        times: dict[str, list[float]] = {"parse": [], "check": [], "parse cpu": [], "check cpu": []}
        for _ in range(repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            document, diagnostics = parse_document(text, str(path))
            times["parse"].append(time.perf_counter() - wall)
            times["parse cpu"].append(time.process_time() - cpu)
            assert document is not None and not diagnostics
            wall, cpu = time.perf_counter(), time.process_time()
            checked = check_file(path)
            times["check"].append(time.perf_counter() - wall)
            times["check cpu"].append(time.process_time() - cpu)
            assert not checked.errors
    return {stage: statistics.median(values) for stage, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rules", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    text = generate(args.rules)
    times = measure(text, args.repeat)
    lines = text.count("\n")
    report = (
        "# Parse benchmark\n\n"
        f"Command: `.venv/bin/python bench/parse.py --rules {args.rules}"
        f" --repeat {args.repeat}`\n\n"
        f"Spec: {args.rules} layer rules, {lines} lines, {len(text) / 1e3:.0f} kB.\n\n"
        "| stage | median wall s | median CPU s | rules per second |\n|---|---|---|---|\n"
        f"| parse (text to IR) | {times['parse']:.3f} | {times['parse cpu']:.3f} "
        f"| {args.rules / times['parse']:,.0f} |\n"
        f"| check (read, parse, merge, validate) | {times['check']:.3f} "
        f"| {times['check cpu']:.3f} | {args.rules / times['check']:,.0f} |\n\n"
        "Target: about 1 s for 5,000 rules (`qspec check`).\n"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
