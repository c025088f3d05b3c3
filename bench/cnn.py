"""EfficientNet-Lite0 (examples/efficientnet_lite0): qspec's W8A8 and weight-only artifacts
against ONNX Runtime's static quantizer, on the same photographs.

Run: .venv/bin/python bench/cnn.py [--runs 10] [--rounds 5] [--reuse]
Writes bench/results/cnn.md. Everything is measured in this one run:
- size: the artifact file;
- fidelity on the 192 held-out crops (photographs never used for calibration), against the
  float PyTorch model: top-1 agreement and the mean KL divergence of the softmax outputs;
- latency: ONNX Runtime CPU at batch 1 and batch 8, the median over `--rounds` rounds of the
  median of `--runs` runs, every artifact measured in each round in turn; the ratio is to the
  FP32 export measured in the same rounds.
Every quantizer calibrates on the same 128 calibration crops. ONNX Runtime's quantize_static
gets the FP32 export after its own pre-processing (shape inference, BatchNorm fusion), QDQ
format, int8 weights per channel and uint8 activations, as its documentation recommends.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from ort_runs import flag_summary, latency, session

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "efficientnet_lite0"
BUILD = ROOT / "bench" / "build" / "cnn"
RESULTS = ROOT / "bench" / "results" / "cnn.md"
SETTLE_S = 1.0  # the previous session's worker threads spin for a while after its last run
W8A8_METHODS = ("minmax", "percentile 99.99", "mse", "entropy")

sys.path.insert(0, str(EXAMPLE))
from model import (  # noqa: E402
    CALIBRATION,
    CALIBRATION_PHOTOS,
    HOLDOUT,
    HOLDOUT_PHOTOS,
    crops,
    load,
)


def fp32_export(module: torch.nn.Module, example: dict, path: Path) -> None:
    dims = {name: {0: torch.export.Dim("batch")} for name in example}
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (), str(path), kwargs=example, dynamo=True, dynamic_shapes=dims,
            external_data=False, output_names=["logits"],
        )  # fmt: skip


def qspec_builds(build: bool = True) -> dict[str, Path]:
    """Compile the example's specs and one W8A8 spec per calibration method (with `build`
    false, the artifacts an earlier run compiled)."""
    specs = {
        "qspec int8 weight-only": EXAMPLE / "int8.qspec",
        "qspec int4 weight-only": EXAMPLE / "int4.qspec",
    }
    w8a8 = (EXAMPLE / "w8a8.qspec").read_text().replace('include "', f'include "{EXAMPLE}/')
    for method in W8A8_METHODS:
        spec = BUILD / f"w8a8-{method.split()[0]}.qspec"
        spec.write_text(w8a8.replace("asymmetric static", f"asymmetric static calibrate {method}"))
        specs[f"qspec W8A8 ({method})"] = spec
    built = {}
    for label, spec in specs.items():
        out = BUILD / spec.stem
        command = [sys.executable, "-m", "qspec", "compile", str(spec), "-o", str(out)]
        if build:
            subprocess.run([*command, "--progress=never", "--no-cache"], check=True)
        built[label] = out / "model.onnx"
    return built


def ort_static(fp32: Path, calibration: np.ndarray, build: bool = True) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.split(calibration, len(calibration) // 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"inputs": batch}

    prepared = BUILD / "fp32-prepared.onnx"
    if build:
        quant_pre_process(str(fp32), str(prepared))
    built = {}
    for method in (
        CalibrationMethod.MinMax,
        CalibrationMethod.Entropy,
        CalibrationMethod.Percentile,
    ):
        out = BUILD / f"ort-static-{method.name.lower()}.onnx"
        built[f"ORT quantize_static ({method.name})"] = out
        if not build:
            continue
        quantize_static(
            str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=method,
        )  # fmt: skip
    return built


def logits(sess: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: b})[0] for b in np.split(images, 24)])


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over images of KL(softmax(reference) || softmax(other)), in nats."""
    p, q = (torch.log_softmax(torch.from_numpy(x).double(), 1) for x in (reference, other))
    return float((p.exp() * (p - q)).sum(1).mean())


def interleaved_latency(
    sessions: dict[str, ort.InferenceSession], images: np.ndarray, runs: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Milliseconds at batch 1 and 8 per artifact: the median of `rounds` medians of `runs`
    runs, the artifacts taking turns in every round so that a slow spell of the machine, or a
    slow predecessor, does not land on one of them."""
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in sessions}
    labels = list(sessions)
    for turn in range(rounds):
        # each round starts one further along: no artifact always follows the same one (right
        # after the slow weight-only ones, batch 1 measured up to 25% slower)
        for label in labels[turn % len(labels) :] + labels[: turn % len(labels)]:
            sess = sessions[label]
            name = sess.get_inputs()[0].name
            time.sleep(SETTLE_S)
            one = latency(sess, {name: images[:1]}, runs)
            samples[label].append((one, latency(sess, {name: images[:8]}, runs)))
    return {
        label: (statistics.median(s[0] for s in pairs), statistics.median(s[1] for s in pairs))
        for label, pairs in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="runs per round")
    parser.add_argument("--rounds", type=int, default=5, help="turns each artifact takes")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure the artifacts an earlier run built in bench/build/cnn (to time them again "
        "on a quiet machine) instead of building them",
    )
    args = parser.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    module, example = load()
    calibration = crops(CALIBRATION_PHOTOS, CALIBRATION, seed=0)
    holdout = crops(HOLDOUT_PHOTOS, HOLDOUT, seed=1)
    with torch.no_grad():
        reference = torch.cat([module(inputs=torch.from_numpy(b)) for b in np.split(holdout, 24)])
    reference_np = reference.numpy()
    fp32 = BUILD / "fp32.onnx"
    if not args.reuse:
        fp32_export(module, example, fp32)
    built = {**qspec_builds(not args.reuse), **ort_static(fp32, calibration, not args.reuse)}
    rows = {"FP32 ONNX export": fp32, **built}
    missing = [str(path) for path in rows.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"--reuse: not built yet: {', '.join(missing)}")

    sessions = {label: session(path) for label, path in rows.items()}
    ms = interleaved_latency(sessions, holdout, args.runs, args.rounds)
    results, lines, base = {}, [], {}
    for label, path in rows.items():
        out = logits(sessions[label], holdout)
        agreement = float((out.argmax(1) == reference_np.argmax(1)).mean())
        lat1, lat8 = ms[label]
        base = base or {"1": lat1, "8": lat8, "bytes": path.stat().st_size}
        size = path.stat().st_size
        results[label] = {
            "file": str(path.relative_to(ROOT)),
            "bytes": size,
            "top1_agreement": agreement,
            "kl": kl_divergence(reference_np, out),
            "ms_batch1": lat1,
            "ms_batch8": lat8,
        }
        lines.append(
            f"| {label} | {size / 1e6:.2f} | {size / base['bytes']:.3f} | {agreement:.4f} "
            f"| {results[label]['kl']:.5f} | {lat1:.2f} ({lat1 / base['1']:.2f}x) "
            f"| {lat8:.2f} ({lat8 / base['8']:.2f}x) |"
        )
        print(lines[-1], flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, flags: {flag_summary()}"
    report = "\n".join(
        [
            "# EfficientNet-Lite0: qspec against ONNX Runtime's static quantizer",
            "",
            f"Command: `.venv/bin/python bench/cnn.py --runs {args.runs} --rounds {args.rounds}"
            f"{' --reuse' if args.reuse else ''}`. "
            "Model: the pretrained EfficientNet-Lite0 of examples/efficientnet_lite0 "
            "(49 BatchNorms, ReLU6, depthwise convolutions). "
            f"Calibration: {CALIBRATION} crops of {len(CALIBRATION_PHOTOS)} "
            f"scikit-image photographs; fidelity on {HOLDOUT} crops of {len(HOLDOUT_PHOTOS)} "
            "other photographs, against the float PyTorch model (top-1 agreement, mean KL "
            f"divergence in nats). Latency: ONNX Runtime {ort.__version__} CPU ({machine}), "
            f"median of {args.rounds} rounds of {args.runs} runs, artifacts taking turns in each "
            "round; the ratio is to the FP32 export in the same rounds.",
            "",
            "| artifact | MB | size / FP32 | top-1 agreement | KL | ms batch 1 | ms batch 8 |",
            "|---|---|---|---|---|---|---|",
            *lines,
            "",
        ]
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(report)
    RESULTS.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
