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

from qspec.compiler.cache import source_digest
from qspec.compiler.capture import primary_tensor
from qspec.compiler.errors import CompileFailure
from qspec.compiler.layercache import Entry, module_digest, open_module_cache
from qspec.compiler.source import Batch
from qspec.passes.calibrate import nonfinite_failure

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
    """Never a perfect score it did not measure: a NaN or infinite output makes its row's
    cosine, the SNR and the top-1 scores NaN (a NaN fails every --fail-under floor), and a
    zero output scores cosine 1 only against a zero reference. float64 throughout: squares
    of float32 outputs, even near float32's limit, do not overflow."""
    ref = np.concatenate([r.reshape(len(r), -1) for r in reference]).astype(np.float64)
    out = np.concatenate([c.reshape(len(c), -1) for c in candidate]).astype(np.float64)
    rows_finite = np.isfinite(ref).all(1) & np.isfinite(out).all(1)
    finite = bool(rows_finite.all())
    with np.errstate(all="ignore"):  # non-finite rows give NaN, as they should
        nr, no = np.linalg.norm(ref, axis=1), np.linalg.norm(out, axis=1)
        cosine = np.clip((ref * out).sum(1) / np.maximum(nr * no, 1e-300), -1.0, 1.0)
        cosine = np.where((nr == 0) | (no == 0), ((nr == 0) & (no == 0)) * 1.0, cosine)
        cosine = np.where(rows_finite, cosine, np.nan)
        noise = float(((ref - out) ** 2).sum())
        signal = float((ref**2).sum())
    if not finite:
        snr = float("nan")
    else:
        snr = 10 * np.log10(signal / noise) if noise > 0 else float("inf")
    top1 = acc_float = acc_art = None
    if labels is not None:
        truth = np.concatenate(labels)
        nan = float("nan")
        top1 = float((ref.argmax(1) == out.argmax(1)).mean()) if finite else nan
        acc_float = float((ref.argmax(1) == truth).mean()) if np.isfinite(ref).all() else nan
        acc_art = float((out.argmax(1) == truth).mean()) if finite else nan
    return Fidelity(
        samples=len(ref),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        snr_db=float(snr),
        max_abs_error=float(np.abs(ref - out).max()) if finite else float("nan"),
        top1_agreement=top1,
        accuracy_float=acc_float,
        accuracy_artifact=acc_art,
    )


def end_to_end(
    module: torch.nn.Module,
    run_artifact: Callable[[Batch], np.ndarray],
    holdout: Sequence[Batch],
    labels: Sequence[torch.Tensor] | None,
    what: str = "the artifact",
) -> Fidelity:
    """The artifact against the float model on the held-out batches. Non-finite outputs on
    finite data fail the build: the float model's, naming where it first overflows; the
    artifact's, with how many samples."""
    reference = reference_outputs(module, holdout)
    for index, output in enumerate(reference):
        if not np.isfinite(output).all():
            raise nonfinite_failure(module, holdout[index], f"held-out batch {index}")
    candidate = [run_artifact(batch) for batch in holdout]
    bad = sum(int((~np.isfinite(c.reshape(len(c), -1))).any(1).sum()) for c in candidate)
    if bad:
        raise CompileFailure(
            f"{what} outputs NaN or infinite values on {bad} of "
            f"{sum(len(c) for c in candidate)} held-out samples (the float model's are finite)"
        )
    truth = [t.numpy() for t in labels] if labels else None
    return compare(reference, candidate, truth)


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
            approximate = lowered[name](*inputs).double()  # float64: squares do not overflow
            noise[name] += float(((approximate - output.double()) ** 2).sum())
            signal[name] += float((output.double() ** 2).sum())

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
        relative = (noise[name] / signal[name]) ** 0.5 if signal[name] else _ratio(noise[name])
        snr = 10 * np.log10(signal[name] / noise[name]) if noise[name] else float("inf")
        errors[name] = {"relative_error": _round(relative), "snr_db": _round(float(snr))}
    return errors


def _ratio(noise: float) -> float:
    """noise / 0: 0 when there is no noise either, else infinite (never a perfect 0)."""
    return float("inf") if noise else 0.0
