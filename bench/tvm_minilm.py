"""qspec's TVM artifacts for all-MiniLM-L6-v2 against its ONNX artifacts and torch eager FP32.

Run: .venv/bin/python bench/tvm_minilm.py [--runs 20] [--specs int4 int4-tuned int8]
Writes bench/results/tvm_minilm.md. One compile per spec emits both artifacts (the examples
list both targets); then, in this one run, every runtime gets the same token batches (1 x 128
and 32 x 128, all positions attended) and the median of `--runs` calls after a warmup, with
every runtime on all cores. Parameter bytes are those of `params.bin`'s tensors, set against the
theoretical minimum of the manifest (codes, scales and zero points at their widths, float
tensors at 4 bytes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import qspec

# All cores for TVM too: set before qspec.compile, whose verification would pin one thread.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples" / "minilm"
BUILD = ROOT / "bench" / "build"
RESULTS = ROOT / "bench" / "results" / "tvm_minilm.md"
SHAPES = ((1, 128), (32, 128))

sys.path.insert(0, str(EXAMPLES))
from model import load  # noqa: E402


def batch(rows: int, length: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(rows).integers(1000, 29000, (rows, length))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


TUNED = """qspec 1
# int4.qspec with the TVM CPU target tuned: each matmul kernel's column tile measured.
include "{examples}/common.qspec"
target tvm {{ device llvm tune trials 64 }}
layer "bert.encoder.layer.*.{{attention,intermediate,output}}.*" {{
  weight int4 group 32 asymmetric round nearest
}}
"""


def spec_path(spec: str) -> Path:
    """An example spec, or `int4-tuned`: int4 with `tune trials 64` on the TVM target."""
    if spec != "int4-tuned":
        return EXAMPLES / f"{spec}.qspec"
    path = BUILD / "int4-tuned.qspec"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TUNED.format(examples=EXAMPLES))
    return path


def median_ms(call: Callable[[], object], runs: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--specs", nargs="+", default=["int4", "int4-tuned", "int8"])
    args = parser.parse_args()
    module, _ = load()
    latency: dict[tuple[str, str], float] = {}
    sizes = []
    for rows, length in SHAPES:
        feed = batch(rows, length)
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        with torch.inference_mode():
            latency[("torch eager fp32", f"{rows}x{length}")] = median_ms(
                lambda tensors=tensors: module(**tensors), args.runs
            )
    for spec in args.specs:
        folder = BUILD / f"tvm-{spec}"
        build = qspec.compile(spec_path(spec), folder)
        tvm_entry = next(t for t in build.manifest["targets"] if t["name"] == "tvm")
        minimum = build.manifest["totals"]["min_bytes"]
        sizes.append((spec, tvm_entry["param_bytes"], build.manifest["totals"], tvm_entry))
        runners = {"onnx": qspec.load(folder, "onnx"), "tvm": qspec.load(folder, "tvm")}
        for rows, length in SHAPES:
            feed = batch(rows, length)
            for name, runner in runners.items():
                key = (f"{spec} {name}", f"{rows}x{length}")
                latency[key] = median_ms(lambda r=runner, f=feed: r(f), args.runs)
        outputs = {name: runner(batch(2, 16))["output"] for name, runner in runners.items()}
        agreement = float(np.abs(outputs["tvm"] - outputs["onnx"]).max())
        sizes[-1] = (*sizes[-1], agreement, minimum)
        print(spec, "done", file=sys.stderr)
    RESULTS.write_text(report(latency, sizes, args.runs))
    print(RESULTS.read_text())


def report(latency: dict, sizes: list, runs: int) -> str:
    import onnxruntime
    import tvm

    lines = [
        "# TVM artifacts for all-MiniLM-L6-v2",
        "",
        f"`{Path(sys.argv[0]).name}`: median of {runs} runs after 3 warmups, "
        f"{os.cpu_count()} cores for every runtime (torch {torch.__version__}, "
        f"ONNX Runtime {onnxruntime.__version__}, TVM {tvm.__version__}). "
        "Inputs: random token ids, every position attended.",
        "",
        "## Latency (ms)",
        "",
        "| artifact | " + " | ".join(f"{r}x{t}" for r, t in SHAPES) + " |",
        "|---|" + "---|" * len(SHAPES),
    ]
    names = sorted({name for name, _ in latency}, key=lambda n: (n != "torch eager fp32", n))
    for name in names:
        cells = [f"{latency[(name, f'{r}x{t}')]:.1f}" for r, t in SHAPES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Ratios (lower is faster)", "", "| ratio | "]
    lines[-1] += " | ".join(f"{r}x{t}" for r, t in SHAPES) + " |"
    lines.append("|---|" + "---|" * len(SHAPES))
    for spec, *_ in sizes:
        for a, b in ((f"{spec} tvm", f"{spec} onnx"), (f"{spec} tvm", "torch eager fp32")):
            shapes = [f"{r}x{t}" for r, t in SHAPES]
            cells = [f"{latency[(a, s)] / latency[(b, s)]:.2f}" for s in shapes]
            lines.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Parameter bytes",
        "",
        "| spec | TVM params | theoretical minimum | ratio | TVM files | ONNX file | "
        "max abs TVM - ONNX |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec, params, totals, entry, agreement, minimum in sizes:
        lines.append(
            f"| {spec} | {params:,} | {minimum:,} | {params / minimum:.4f} | "
            f"{entry['bytes']:,} | {totals['artifact_bytes']:,} | {agreement:.2e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
