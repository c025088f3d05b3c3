"""Fidelity on text the build never saw: qspec's GPTQ (and GPTQ + EoRA) on MiniLM against a
reference written from the papers, each calibrated on the same rows and scored on the same
held-out rows of seven sources.

Run: .venv/bin/python bench/fidelity_text.py
Writes bench/results/fidelity_text.md and .json. Every number is measured in this one run.

Calibration, two ways: the Python docstrings the MiniLM examples used to calibrate on alone
(`docstrings`), and the six-domain mix of examples/data (`mix`: wiki, web, code, technical,
multilingual, stories; equal weights). Held out: the last 64 rows of each of the seven sources
(qspec's `holdout` and `verify` rows), so each build is scored in and out of its domain. The
score is the cosine of the sentence embedding to the float model's, per sentence: mean, 1st
percentile and minimum per source.

Reference: GPTQ as in Frantar et al. 2022 (Algorithm 1: Cholesky of the damped inverse Hessian,
lazy blocks of 128 columns, min-max asymmetric scales per group of 32 taken when the group is
reached, damping 1% of the mean diagonal), every layer's Hessian from the float model's inputs
(not sequential), padding left out; EoRA as in Liu et al. 2024 (the SVD of the quantization
error projected onto the eigenspace of the layer's input second moment, scaled by the
eigenvalues' square roots, rank 32). Weights are fake-quantized in PyTorch. qspec's builds are
ONNX artifacts run by ONNX Runtime (its report's per-source fidelity).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qspec.compiler.source import shares

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "minilm"
RESULTS = ROOT / "bench" / "results" / "fidelity_text.md"
DOMAINS = ("wiki", "web", "code", "technical", "multilingual", "stories")
CALIBRATION = {"docstrings": ("batches",), "mix": DOMAINS}
SAMPLES, HELD = 128, 64  # calibration rows in all, held-out rows per source
LAYERS = re.compile(r"bert\.encoder\.layer\.\d+\.(attention|intermediate|output)\..*")
METHODS = {
    "int4 g32 GPTQ": ("weight int4 group 32 asymmetric round gptq", 4, 0),
    "int3 g32 GPTQ": ("weight int3 group 32 asymmetric round gptq", 3, 0),
    "int3 g32 GPTQ + EoRA r32": (
        "weight int3 group 32 asymmetric round gptq\n  compensate lora rank 32 by eora",
        3,
        32,
    ),
}

sys.path.insert(0, str(EXAMPLE))
import model as minilm  # noqa: E402


def rows(source: str) -> list[dict[str, torch.Tensor]]:
    """Every batch of one of the example's sources, as its entry yields them."""
    return list(getattr(minilm, source)())


def split(batches: list[dict[str, torch.Tensor]], first: int, last: int):
    """The first `first` rows and the last `last` rows, as qspec cuts a source, in batches
    of 8 padded to their longest row."""
    unpadded = [
        {k: v[i, : int(b["attention_mask"][i].sum())] for k, v in b.items()}
        for b in batches
        for i in range(len(b["input_ids"]))
    ]
    return _batched(unpadded[:first]), _batched(unpadded[len(unpadded) - last :])


def _batched(rows: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    out = []
    for low in range(0, len(rows), 8):
        group = rows[low : low + 8]
        out.append(
            {
                k: nn.utils.rnn.pad_sequence([r[k] for r in group], batch_first=True)
                for k in group[0]
            }
        )
    return out


# ---- reference ---------------------------------------------------------------------------


def hessians(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """XᵀX / n of each layer's input over the real (unpadded) tokens, from the float model."""
    sums = {name: None for name in names}
    counts = dict.fromkeys(names, 0)
    modules = dict(model.named_modules())
    current: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output, name):
        x = inputs[0].detach()[current["mask"]].double()
        sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
        counts[name] += len(x)

    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            model(**batch)
    for handle in handles:
        handle.remove()
    return {name: sums[name] / counts[name] for name in names}


def quantize_group(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Min-max asymmetric scale and zero point of each row of a [rows, 32] group."""
    top = 2**bits - 1
    low, high = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    scale = ((high - low) / top).clamp(min=1e-12)
    zero = torch.round(-low / scale)
    return scale, zero


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group: int = 32, block: int = 128):
    """The quantized W (fake-quantized, float) by GPTQ's Algorithm 1."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += 0.01 * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    top = 2**bits - 1
    scale = zero = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:
                # from the weights as updated so far (the reference code reads the block's
                # columns before this block's updates)
                scale, zero = quantize_group(W1[:, i : i + group], bits)
            w, d = W1[:, i], Hinv[i1 + i, i1 + i]
            q = (torch.clamp(torch.round(w / scale) + zero, 0, top) - zero) * scale
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv[i1 + i, i1 + i : i2].unsqueeze(0)
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q.float()


def eora(E: torch.Tensor, H: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-`rank` correction B A of the error E in the eigenspace of H (EoRA)."""
    values, vectors = torch.linalg.eigh(H.double())
    root = values.clamp(min=0).sqrt()
    projected = E.double() @ vectors * root  # E Q sqrt(Λ)
    U, S, Vh = torch.linalg.svd(projected, full_matrices=False)
    keep = root > root.max() * 1e-8
    back = torch.zeros_like(vectors)
    back[:, keep] = vectors[:, keep] / root[keep]  # (Q sqrt(Λ))^-1 = sqrt(Λ)^-1 Qᵀ
    B = U[:, :rank] * S[:rank]
    A = Vh[:rank] @ back.T
    return (B @ A).float()


def reference(calibration, bits: int, rank: int) -> nn.Module:
    model, _ = minilm.load()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and LAYERS.match(n)]
    found = hessians(model, names, calibration)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            quantized = gptq(weight.data, found[name], bits)
            if rank:
                quantized += eora(weight.data - quantized, found[name], rank)
            weight.copy_(quantized)
    return model


def cosines(model: nn.Module, float_model: nn.Module, batches) -> np.ndarray:
    with torch.no_grad():
        pairs = [(model(**b), float_model(**b)) for b in batches]
    return torch.cat([torch.cosine_similarity(a, b, dim=1) for a, b in pairs]).double().numpy()


# ---- qspec -------------------------------------------------------------------------------


def qspec_build(folder: Path, calibration: str, setting: str) -> dict[str, dict]:
    """Per-source fidelity of a qspec ONNX build calibrated and held out as the reference is."""
    model = EXAMPLE / "model.py"
    sources = CALIBRATION[calibration]
    others = [s for s in ("batches", *DOMAINS) if s not in sources]
    calibrate = ", ".join(f'"{model}:{s}"' for s in sources)
    lines = [
        "qspec 1",
        f'model "{model}:load"',
        f"calibration {calibrate} samples {SAMPLES} holdout {HELD * len(sources)}",
        *(f'verify "{model}:{s}" samples {HELD}' for s in others),
        "target onnx { device cpu opset 21 }",
        f'layer "bert.encoder.layer.*.{{attention,intermediate,output}}.*" {{\n  {setting}\n}}',
    ]
    spec = folder / f"{calibration}.qspec"
    spec.write_text("\n".join(lines) + "\n")
    out = folder / "build"
    command = [sys.executable, "-m", "qspec", "compile", str(spec), "-o", str(out)]
    subprocess.run([*command, "--no-cache", "--progress=never"], check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())["fidelity"]
    return {s["source"].rpartition(":")[2]: s for s in report["sources"]}


def summary(values: np.ndarray) -> dict[str, float]:
    return {
        "cosine_mean": float(values.mean()),
        "cosine_p1": float(np.percentile(values, 1)),
        "cosine_min": float(values.min()),
    }


def main() -> None:
    sources = ("batches", *DOMAINS)
    float_model, _ = minilm.load()
    data = {s: rows(s) for s in sources}
    results: dict[str, dict] = {}
    for calibration, calibrating in CALIBRATION.items():
        counts = shares(SAMPLES, [1.0] * len(calibrating))
        calib = [
            b for s, n in zip(calibrating, counts, strict=True) for b in split(data[s], n, 0)[0]
        ]
        held = {s: split(data[s], 0, HELD)[1] for s in sources}
        for method, (setting, bits, rank) in METHODS.items():
            model = reference(calib, bits, rank)
            ref = {s: summary(cosines(model, float_model, held[s])) for s in sources}
            with tempfile.TemporaryDirectory() as folder:
                ours = qspec_build(Path(folder), calibration, setting)
            results[f"{method}, calibrated on {calibration}"] = {
                "reference": ref,
                "qspec": {s: {k: ours[s][k] for k in ref[s]} for s in sources},
            }
            print(
                method,
                calibration,
                json.dumps(results[f"{method}, calibrated on {calibration}"]),
                flush=True,
            )
    write(results)


def write(results: dict[str, dict]) -> None:
    sources = ("batches", *DOMAINS)
    names = {"batches": "docstrings"}
    lines = [
        "# Fidelity on text the build never saw: qspec against reference GPTQ / EoRA",
        "",
        "Command: `.venv/bin/python bench/fidelity_text.py`. Model: all-MiniLM-L6-v2 "
        f"(examples/minilm), the encoder's 36 Linear layers. {SAMPLES} calibration rows; "
        f"{HELD} held-out rows per source. Cells: cosine to the float embedding, mean / 1st "
        "percentile / min over the source's held-out rows. A source the build calibrated on "
        "is marked *.",
        "",
    ]
    for label, found in results.items():
        calibrated = CALIBRATION[label.rpartition(" on ")[2]]
        lines += [f"## {label}", "", "| source | reference | qspec | qspec - reference (mean) |"]
        lines.append("|---|---|---|---|")
        for s in sources:
            ref, ours = found["reference"][s], found["qspec"][s]
            cells = [
                " / ".join(f"{v[k]:.4f}" for k in ("cosine_mean", "cosine_p1", "cosine_min"))
                for v in (ref, ours)
            ]
            mark = "*" if s in calibrated else ""
            delta = ours["cosine_mean"] - ref["cosine_mean"]
            lines.append(f"| {names.get(s, s)}{mark} | {cells[0]} | {cells[1]} | {delta:+.4f} |")
        lines.append("")
    RESULTS.write_text("\n".join(lines))
    RESULTS.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
