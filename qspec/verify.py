"""Fidelity of an artifact to the float model, measured on held-out batches.

End to end: the artifact's own runtime output against the float PyTorch output (cosine per
sample, SNR, max error; top-1 agreement and accuracy when labels exist). Per layer: each
lowered layer fed the float model's input to that layer, against the float layer's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from qspec.compiler.capture import primary_tensor
from qspec.compiler.layercache import Entry, module_digest, open_module_cache, source_digest
from qspec.compiler.source import Batch

# The cache's kinds for the float model's outputs and each layer's errors, and the code that
# computes them besides the stages every key covers.
REFERENCE, LAYER_ERROR = "reference", "layer-error"
_SOURCE = Path(__file__).read_bytes()


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
    candidate = [run_artifact(batch) for batch in holdout]
    truth = [t.numpy() for t in labels] if labels else None
    return compare(reference_outputs(module, holdout), candidate, truth)


def reference_outputs(module: torch.nn.Module, holdout: Sequence[Batch]) -> list[np.ndarray]:
    """The float model's outputs, cached by content: every target compares against them."""
    cache = open_module_cache(module, holdout)
    if cache is None:
        return _run_float(module, holdout)
    key = cache.key(REFERENCE, _SOURCE)
    found = cache.load(REFERENCE, key, "float model", partial(_outputs, count=len(holdout)))
    if found is None:
        found = _run_float(module, holdout)
        cache.save(REFERENCE, key, Entry({}, {str(i): out for i, out in enumerate(found)}))
    return found


def _run_float(module: torch.nn.Module, holdout: Sequence[Batch]) -> list[np.ndarray]:
    with torch.no_grad():
        return [primary_output(module(**batch)) for batch in holdout]


def _outputs(entry: Entry, count: int) -> list[np.ndarray]:
    return [entry.arrays[str(i)] for i in range(count)]


def per_layer(
    module: torch.nn.Module, lowered: dict[str, torch.nn.Module], holdout: Sequence[Batch]
) -> dict[str, dict[str, float]]:
    """Relative output error and SNR of each lowered layer on the float model's layer inputs,
    each cached by content (the float model and data, the lowered layer and its backend's
    code): only the layers not cached run."""
    cache = open_module_cache(module, holdout)
    errors: dict[str, dict[str, float]] = {}
    keys: dict[str, str] = {}
    if cache is not None:
        code = source_digest("backends")
        for name, layer in lowered.items():
            keys[name] = cache.key(LAYER_ERROR, name, module_digest(layer), code, _SOURCE)
            found = cache.load(LAYER_ERROR, keys[name], name, _layer_error)
            if found is not None:
                errors[name] = found
    measured = _per_layer(module, {n: m for n, m in lowered.items() if n not in errors}, holdout)
    if cache is not None:
        for name, error in measured.items():
            cache.save(LAYER_ERROR, keys[name], Entry(error))
    errors |= measured
    return {name: errors[name] for name in lowered}


def _layer_error(entry: Entry) -> dict[str, float]:
    return {"relative_error": entry.meta["relative_error"], "snr_db": entry.meta["snr_db"]}


def _per_layer(
    module: torch.nn.Module, lowered: dict[str, torch.nn.Module], holdout: Sequence[Batch]
) -> dict[str, dict[str, float]]:
    if not lowered:
        return {}
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
