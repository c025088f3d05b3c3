"""qspec's ONNX artifacts for all-MiniLM-L6-v2 against ONNX Runtime's own quantizers.

Run: .venv/bin/python bench/onnx_minilm.py [--runs 20] [--specs int8 int4 ...]
Writes bench/results/onnx_minilm.md. Everything is measured in this one run: sizes from the
files, fidelity on held-out sentences (never used for calibration) against the float PyTorch
model, latency as the median of `--runs` ONNX Runtime CPU runs relative to the FP32 export.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from ort_runs import latency, session

import qspec

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples" / "minilm"
BUILD = ROOT / "bench" / "build"
RESULTS = ROOT / "bench" / "results" / "onnx_minilm.md"
SPECS = ("int8", "int4", "w8a8", "embed4")
HELD_OUT = 128  # the last sentences: the specs calibrate on the first 128
SEQ = 128

sys.path.insert(0, str(EXAMPLES))
from model import load, sentences, tokenize, tokenizer  # noqa: E402


def fp32_export(module: torch.nn.Module, example: dict, path: Path) -> None:
    """The plain dynamo export ORT's quantizers start from (weights as MatMul initializers)."""
    dims = {name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")} for name in example}
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (),
            str(path),
            kwargs=example,
            dynamo=True,
            dynamic_shapes=dims,
            external_data=False,
            output_names=["output"],
        )


def ort_quantizers(fp32: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    dynamic = BUILD / "ort_quantize_dynamic.onnx"
    quantize_dynamic(fp32, dynamic, weight_type=QuantType.QInt8)
    nbits = BUILD / "ort_matmulnbits_rtn4.onnx"
    quantizer = MatMulNBitsQuantizer(str(fp32), bits=4, block_size=32, is_symmetric=False)
    quantizer.process()
    quantizer.model.save_model_to_file(str(nbits), use_external_data_format=False)
    return {
        "ORT quantize_dynamic (int8)": dynamic,
        "ORT MatMulNBitsQuantizer (RTN int4 g32)": nbits,
    }


def held_out() -> list[dict[str, np.ndarray]]:
    texts = sentences()[-HELD_OUT:]
    return [
        {k: v.numpy() for k, v in tokenize(texts[start : start + 16]).items()}
        for start in range(0, len(texts), 16)
    ]


def full_length(batch: int) -> dict[str, np.ndarray]:
    """`batch` rows of exactly SEQ real tokens: consecutive sentences packed end to end."""
    ids = tokenizer()(" ".join(sentences()), add_special_tokens=False)["input_ids"]
    rows = [[101, *ids[i * (SEQ - 2) : (i + 1) * (SEQ - 2)], 102] for i in range(batch)]
    input_ids = np.asarray(rows, dtype=np.int64)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}


def cosines(run, reference: list[np.ndarray], batches) -> np.ndarray:
    values = []
    for batch, ref in zip(batches, reference, strict=True):
        out = run(batch)
        values.append(
            (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        )
    return np.concatenate(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--specs", nargs="*", default=list(SPECS))
    args = parser.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    module, example = load()
    batches = held_out()
    with torch.no_grad():
        reference = [
            module(**{k: torch.from_numpy(v) for k, v in b.items()}).numpy() for b in batches
        ]
    fp32 = BUILD / "fp32.onnx"
    fp32_export(module, example, fp32)
    rows: list[tuple[str, Path, int | None]] = [("FP32 ONNX export", fp32, None)]
    for name in args.specs:
        build = qspec.compile(EXAMPLES / f"{name}.qspec", BUILD / name)
        rows.append(
            (
                f"qspec {name}.qspec",
                BUILD / name / "model.onnx",
                build.manifest["totals"]["min_bytes"],
            )
        )
    rows += [(label, path, None) for label, path in ort_quantizers(fp32).items()]

    small, large = full_length(1), full_length(32)
    fp32_bytes = fp32.stat().st_size
    base: dict[str, float] = {}
    lines = []
    for label, path, minimum in rows:
        sess = session(path)
        scores = cosines(lambda b, s=sess: s.run(None, b)[0], reference, batches)
        lat1, lat32 = latency(sess, small, args.runs), latency(sess, large, args.runs)
        base = base or {"1": lat1, "32": lat32}
        size = path.stat().st_size
        to_min = f"{size / minimum:.3f}" if minimum else "-"
        lines.append(
            f"| {label} | {size / 1e6:.2f} | {size / fp32_bytes:.3f} | {to_min} "
            f"| {scores.mean():.5f} | {scores.min():.5f} | {lat1:.2f} ({lat1 / base['1']:.2f}x) "
            f"| {lat32:.1f} ({lat32 / base['32']:.2f}x) |"
        )
        print(lines[-1], flush=True)
    report = "\n".join(
        [
            "# ONNX artifacts for all-MiniLM-L6-v2",
            "",
            f"Command: `.venv/bin/python bench/onnx_minilm.py --runs {args.runs}`. "
            f"Fidelity: cosine of sentence embeddings to float PyTorch on the last {HELD_OUT} of "
            f"{len(sentences())} standard-library docstring sentences (the specs calibrate on the "
            f"first 128). Latency: ONNX Runtime {ort.__version__} CPU, {torch.get_num_threads()} "
            f"threads, median of {args.runs} runs, batches of {SEQ} real tokens per row; the ratio "
            "is to the FP32 export in the same run.",
            "",
            "| artifact | MB | size / FP32 | size / theoretical min | mean cosine | min cosine "
            "| ms batch 1x128 | ms batch 32x128 |",
            "|---|---|---|---|---|---|---|---|",
            *lines,
            "",
        ]
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
