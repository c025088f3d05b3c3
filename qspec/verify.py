"""Fidelity of an artifact to the float model, measured on held-out batches.

End to end: each of the artifact's own runtime outputs against the float PyTorch output in
the same place (cosine per sample: mean, minimum, 1st percentile and the mean's standard
error; SNR, max error; exact agreement for integer and bool outputs; one cosine over the
held-out column where each sample, or batch, has one value), the headline the worst output's
and, where the held-out rows come from several sources, the worst source's; top-1 agreement and
accuracy on the first output when labels exist. Per layer: each lowered layer fed the float
model's input to that layer, against the float layer's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from qspec.compiler.cache import source_digest
from qspec.compiler.capture import output_tensors
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
    cosine_p1: float  # the 1st percentile of the per-sample cosines
    cosine_sem: float  # the standard error of cosine_mean
    snr_db: float
    max_abs_error: float
    top1_agreement: float | None = None
    accuracy_float: float | None = None
    accuracy_artifact: float | None = None
    # (name, fidelity) of each output when the model has more than one
    outputs: tuple[tuple[str, Fidelity], ...] = ()
    # (source, fidelity) of each source of held-out rows when there are several
    sources: tuple[tuple[str, Fidelity], ...] = ()

    def as_dict(self) -> dict:
        """The scores, `outputs` only for a model with several and `sources` only for
        held-out rows from several sources (other reports stay as they were)."""
        nested = ("outputs", "sources")
        found: dict = {
            f.name: _round(getattr(self, f.name)) for f in fields(self) if f.name not in nested
        }
        if self.outputs:
            found["outputs"] = [
                {"name": name} | {k: _round(getattr(each, k)) for k in _PER_OUTPUT}
                for name, each in self.outputs
            ]
        if self.sources:
            found["sources"] = [{"source": name} | each.as_dict() for name, each in self.sources]
        return found

    def unresolved(self) -> str | None:
        """Why these samples cannot tell the build from its float model, if they cannot: the
        95% interval of the mean cosine is wider than half its distance from 1."""
        distance = 1 - self.cosine_mean
        if not (math.isfinite(distance) and math.isfinite(self.cosine_sem)) or distance <= 0:
            return None
        if 1.96 * self.cosine_sem <= distance / 2:
            return None
        wanted = math.ceil(self.samples * (2 * 1.96 * self.cosine_sem / distance) ** 2)
        return (
            f"{self.samples} held-out samples measure the mean cosine {self.cosine_mean:.4f} "
            f"only to +-{1.96 * self.cosine_sem:.4f}: hold out about {wanted} to resolve it"
        )

    def unresolved_sources(self) -> list[str]:
        """`unresolved` of each held-out source (of the whole, with one), named."""
        named = self.sources or (("", self),)
        found = [(source, fidelity.unresolved()) for source, fidelity in named]
        return [f"{source + ': ' if source else ''}{why}" for source, why in found if why]

    def worst_output(self) -> str | None:
        """The output with the lowest mean cosine (NaN lowest), to name it; None for one."""
        if not self.outputs:
            return None
        cosines = [
            -math.inf if math.isnan(f.cosine_mean) else f.cosine_mean for _, f in self.outputs
        ]
        return self.outputs[cosines.index(min(cosines))][0]


_PER_OUTPUT = ("cosine_mean", "cosine_min", "cosine_p1", "snr_db", "max_abs_error")


def _round(value):
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _rows(array: np.ndarray) -> np.ndarray:
    """One row per sample; a 0-d output (a scalar per batch) is one row."""
    return array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)


def _predicted(rows: np.ndarray) -> np.ndarray:
    """The class of each row: the largest logit, or the row's one value (a model that
    returns class ids)."""
    return rows.argmax(1) if rows.shape[1] > 1 else rows[:, 0]


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None,
) -> Fidelity:
    """Never a perfect score it did not measure: a NaN or infinite output makes its row's
    cosine, the SNR and the top-1 scores NaN (a NaN fails every --fail-under floor), and a
    zero output scores cosine 1 only against a zero reference. float64 throughout: squares
    of float32 outputs, even near float32's limit, do not overflow.

    Where cosine per sample would measure nothing, the "cosine" is another score in [-1, 1]:
    integer or bool outputs (class ids, masks) score 1 per sample whose values all equal the
    reference's, else 0, so the mean is the fraction of samples that agree; and an output with
    one value per sample ([B], [B, 1]) or per batch (0-d), whose cosine per row is only its
    sign, scores one cosine over the whole held-out column (mean and min alike)."""
    ref_rows = np.concatenate([_rows(r) for r in reference])
    out_rows = np.concatenate([_rows(c) for c in candidate])
    ref, out = ref_rows.astype(np.float64), out_rows.astype(np.float64)
    rows_finite = np.isfinite(ref).all(1) & np.isfinite(out).all(1)
    finite = bool(rows_finite.all())
    with np.errstate(all="ignore"):  # non-finite rows give NaN, as they should
        if not (_is_float(ref_rows) and _is_float(out_rows)):
            cosine = (ref_rows == out_rows).all(1) * 1.0  # exact: compared before float64
        elif ref.shape[1] == 1:
            cosine = np.full(len(ref), _cosine(ref.T, out.T)[0] if finite else np.nan)
        else:
            cosine = _cosine(ref, out)
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
        ref_class, out_class = _predicted(ref), _predicted(out)
        top1 = float((ref_class == out_class).mean()) if finite else nan
        acc_float = float((ref_class == truth).mean()) if np.isfinite(ref).all() else nan
        acc_art = float((out_class == truth).mean()) if finite else nan
    sem = float(cosine.std(ddof=1) / math.sqrt(len(cosine))) if len(cosine) > 1 else math.inf
    return Fidelity(
        samples=len(ref),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        cosine_p1=float(np.percentile(cosine, 1)),
        cosine_sem=sem,
        snr_db=float(snr),
        max_abs_error=float(np.abs(ref - out).max()) if finite else float("nan"),
        top1_agreement=top1,
        accuracy_float=acc_float,
        accuracy_artifact=acc_art,
    )


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _cosine(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine of each row pair; a zero row scores 1 only against a zero row."""
    nr, no = np.linalg.norm(ref, axis=1), np.linalg.norm(out, axis=1)
    cosine = np.clip((ref * out).sum(1) / np.maximum(nr * no, 1e-300), -1.0, 1.0)
    return np.where((nr == 0) | (no == 0), ((nr == 0) & (no == 0)) * 1.0, cosine)


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    labels: Sequence[np.ndarray] | None,
) -> Fidelity:
    """`compare` for each output (indexed [batch][output]); the headline is the worst output's
    (lowest cosine and SNR, largest error, NaN if any is NaN), so no --fail-under floor passes
    while one output is bad. Top-1 scores are the first output's."""
    each = [
        compare([r[i] for r in reference], [c[i] for c in candidate], labels if i == 0 else None)
        for i in range(len(names))
    ]
    if len(each) == 1:
        return each[0]
    return replace(worst_of(each), outputs=tuple(zip(names, each, strict=True)))


def worst_of(each: Sequence[Fidelity]) -> Fidelity:
    """One headline for several outputs or sources: the lowest cosines and SNR, the largest
    error and the lowest top-1 agreement (NaN if any is NaN), so that no --fail-under floor
    passes while one is bad; accuracy and the standard error are the first's."""
    top1 = [f.top1_agreement for f in each if f.top1_agreement is not None]
    return replace(
        each[0],
        outputs=(),
        samples=max(f.samples for f in each),  # a 0-d output has one row per batch
        cosine_mean=_worst([f.cosine_mean for f in each], min),
        cosine_min=_worst([f.cosine_min for f in each], min),
        cosine_p1=_worst([f.cosine_p1 for f in each], min),
        snr_db=_worst([f.snr_db for f in each], min),
        max_abs_error=_worst([f.max_abs_error for f in each], max),
        top1_agreement=_worst(top1, min) if top1 else None,
    )


def _worst(values: list[float], pick: Callable[[list[float]], float]) -> float:
    """`pick` of the values, NaN when any is (min and max skip or keep NaN by position)."""
    return float("nan") if any(math.isnan(v) for v in values) else pick(values)


def artifact_outputs(
    runner: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
) -> Callable[[Batch], list[np.ndarray]]:
    """A runner as `end_to_end` calls it: a batch of torch tensors in, every output out, in
    the artifact's order (the order the float model's outputs flatten in)."""
    return lambda batch: list(runner({k: v.numpy() for k, v in batch.items()}).values())


def end_to_end(
    module: torch.nn.Module,
    run_artifact: Callable[[Batch], Sequence[np.ndarray]],
    holdout: Sequence[Batch],
    labels: Sequence[torch.Tensor] | None,
    what: str = "the artifact",
    groups: Sequence[tuple[str, int]] = (),
) -> Fidelity:
    """The artifact against the float model on the held-out batches, every output. Non-finite
    outputs on finite data fail the build: the float model's, naming where it first
    overflows; the artifact's, with how many samples. Samples are the held-out rows, also
    where an output is 0-d (one value per batch). `groups` (source, batches) in order: with
    several, each source is scored alone and the headline is the worst source's."""
    names, reference = reference_outputs(module, holdout)
    for index, outputs in enumerate(reference):
        if not all(np.isfinite(output).all() for output in outputs):
            raise nonfinite_failure(module, holdout[index], f"held-out batch {index}")
    candidate = [list(run_artifact(batch)) for batch in holdout]
    if any(len(outputs) != len(names) for outputs in candidate):
        raise CompileFailure(
            f"{what} returns {len(candidate[0])} outputs where the float model returns "
            f"{len(names)} ({', '.join(names)})"
        )
    rows = [len(next(iter(batch.values()))) for batch in holdout]
    bad = sum(_bad_samples(outputs, n) for outputs, n in zip(candidate, rows, strict=True))
    if bad:
        raise CompileFailure(
            f"{what} outputs NaN or infinite values on {bad} of "
            f"{sum(rows)} held-out samples (the float model's are finite)"
        )
    truth = [t.numpy() for t in labels] if labels else None
    if len(groups) < 2:
        return replace(compare_outputs(names, reference, candidate, truth), samples=sum(rows))
    each, start = [], 0
    for source, count in groups:
        window = slice(start, start + count)
        scored = compare_outputs(
            names, reference[window], candidate[window], truth[window] if truth else None
        )
        each.append((source, replace(scored, samples=sum(rows[window]))))
        start += count
    headline = worst_of([fidelity for _, fidelity in each])
    return replace(headline, samples=sum(rows), sources=tuple(each))


def _bad_samples(outputs: Sequence[np.ndarray], rows: int) -> int:
    """The batch's samples with a NaN or infinite value in any output; a non-finite output
    that is not one row per sample (a 0-d scalar) spoils the whole batch."""
    bad = np.zeros(rows, bool)
    for output in outputs:
        if output.ndim and len(output) == rows:
            bad |= ~np.isfinite(_rows(output)).all(1)
        elif not np.isfinite(output).all():
            bad[:] = True
    return int(bad.sum())


def reference_outputs(
    module: torch.nn.Module, holdout: Sequence[Batch]
) -> tuple[list[str], list[list[np.ndarray]]]:
    """The float model's output names and, per batch, every output: cached by content, as
    every target compares against them."""
    cache = open_module_cache(module, holdout)
    if cache is None:
        return _run_float(module, holdout)
    key = cache.key(REFERENCE, _SOURCE)
    found = cache.load(REFERENCE, key, "float model", partial(_outputs, count=len(holdout)))
    if found is None:
        found = _run_float(module, holdout)
        names, outputs = found
        arrays = {f"{i}.{j}": out for i, batch in enumerate(outputs) for j, out in enumerate(batch)}
        cache.save(REFERENCE, key, Entry({"names": names}, arrays))
    return found


def _run_float(
    module: torch.nn.Module, holdout: Sequence[Batch]
) -> tuple[list[str], list[list[np.ndarray]]]:
    names: list[str] = []
    outputs = []
    with torch.no_grad():
        for batch in holdout:
            named = output_tensors(module(**batch))
            names = [name for name, _ in named]
            outputs.append([_numpy(tensor) for _, tensor in named])
    return names, outputs


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """float32 for a float output (numpy has no bfloat16); integer and bool outputs keep
    their dtype, so they are scored by exact agreement."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def _outputs(entry: Entry, count: int) -> tuple[list[str], list[list[np.ndarray]]]:
    names = list(entry.meta["names"])
    arrays = [[entry.arrays[f"{i}.{j}"] for j in range(len(names))] for i in range(count)]
    return names, arrays


def per_layer(
    module: torch.nn.Module,
    lowered: dict[str, torch.nn.Module],
    holdout: Sequence[Batch],
    clamps: dict[str, tuple[float, float] | None],
) -> dict[str, dict[str, float]]:
    """Relative output error and SNR of each lowered layer on the float model's layer inputs,
    after the clamping activation that reads a layer's output where there is one (what the
    next layer sees), each cached by content (the float model and data, the lowered layer and
    its backend's code): only the layers not cached run."""
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
    missing = {n: m for n, m in lowered.items() if n not in errors}
    measured = _per_layer(module, missing, holdout, clamps)
    if cache is not None:
        for name, error in measured.items():
            cache.save(LAYER_ERROR, keys[name], Entry(error))
    errors |= measured
    return {name: errors[name] for name in lowered}


def _layer_error(entry: Entry) -> dict[str, float]:
    return {"relative_error": entry.meta["relative_error"], "snr_db": entry.meta["snr_db"]}


def _per_layer(
    module: torch.nn.Module,
    lowered: dict[str, torch.nn.Module],
    holdout: Sequence[Batch],
    clamps: dict[str, tuple[float, float] | None],
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
            # `inputs` went through the layer's pre-hooks already: skip the lowered copy's
            approximate = _clamped(lowered[name].forward(*inputs), clamps.get(name)).double()
            output = _clamped(output, clamps.get(name)).double()  # float64: no overflow
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
        relative = (noise[name] / signal[name]) ** 0.5 if signal[name] else _ratio(noise[name])
        snr = 10 * np.log10(signal[name] / noise[name]) if noise[name] else float("inf")
        errors[name] = {"relative_error": _round(relative), "snr_db": _round(float(snr))}
    return errors


def _clamped(y: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    return y if clamp is None else torch.clamp(y, *clamp)


def _ratio(noise: float) -> float:
    """noise / 0: 0 when there is no noise either, else infinite (never a perfect 0)."""
    return float("inf") if noise else 0.0
