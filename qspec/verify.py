"""Fidelity of an artifact to the float model, measured on held-out batches.

End to end: the artifact's own runtime output against the float PyTorch output (cosine per
sample, SNR, max error; top-1 agreement and accuracy when labels exist). Per layer: each
lowered layer fed the float model's input to that layer, against the float layer's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from qspec.compiler.capture import primary_tensor
from qspec.compiler.source import Batch


@dataclass(frozen=True)
class Fidelity:
    samples: int
    cosine_mean: float
    cosine_min: float
    snr_db: float
    max_abs_error: float
    top1_agreement: float | None = None
    accuracy_float: float | None = None
    accuracy_artifact: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: _round(v) for k, v in asdict(self).items()}


def _round(value):
    return float(f"{value:.6g}") if isinstance(value, float) else value


def primary_output(output) -> np.ndarray:
    return primary_tensor(output).detach().float().numpy()


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None,
) -> Fidelity:
    ref = np.concatenate([r.reshape(len(r), -1) for r in reference]).astype(np.float64)
    out = np.concatenate([c.reshape(len(c), -1) for c in candidate]).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = np.where(norms > 0, (ref * out).sum(1) / np.maximum(norms, 1e-30), 1.0)
    noise = float(((ref - out) ** 2).sum())
    snr = 10 * np.log10(float((ref**2).sum()) / noise) if noise > 0 else float("inf")
    top1 = acc_float = acc_art = None
    if labels is not None:
        truth = np.concatenate(labels)
        top1 = float((ref.argmax(1) == out.argmax(1)).mean())
        acc_float = float((ref.argmax(1) == truth).mean())
        acc_art = float((out.argmax(1) == truth).mean())
    return Fidelity(
        samples=len(ref),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        snr_db=float(snr),
        max_abs_error=float(np.abs(ref - out).max()),
        top1_agreement=top1,
        accuracy_float=acc_float,
        accuracy_artifact=acc_art,
    )


def end_to_end(
    module: torch.nn.Module,
    run_artifact: Callable[[Batch], np.ndarray],
    holdout: Sequence[Batch],
    labels: Sequence[torch.Tensor] | None,
) -> Fidelity:
    reference, candidate = [], []
    with torch.no_grad():
        for batch in holdout:
            reference.append(primary_output(module(**batch)))
            candidate.append(run_artifact(batch))
    truth = [t.numpy() for t in labels] if labels else None
    return compare(reference, candidate, truth)


def per_layer(
    module: torch.nn.Module, lowered: dict[str, torch.nn.Module], holdout: Sequence[Batch]
) -> dict[str, dict[str, float]]:
    """Relative output error and SNR of each lowered layer on the float model's layer inputs."""
    noise = dict.fromkeys(lowered, 0.0)
    signal = dict.fromkeys(lowered, 0.0)
    hooks = []
    for name, child in module.named_modules():
        if name not in lowered:
            continue

        def hook(_module, inputs, output, name: str = name) -> None:
            approximate = lowered[name](*inputs)
            noise[name] += float(((approximate - output) ** 2).sum())
            signal[name] += float((output**2).sum())

        hooks.append(child.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in holdout:
                module(**batch)
    finally:
        for handle in hooks:
            handle.remove()
    errors = {}
    for name in lowered:
        relative = (noise[name] / signal[name]) ** 0.5 if signal[name] else 0.0
        snr = 10 * np.log10(signal[name] / noise[name]) if noise[name] else float("inf")
        errors[name] = {"relative_error": _round(relative), "snr_db": _round(float(snr))}
    return errors
