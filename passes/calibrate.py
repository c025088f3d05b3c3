"""calibrate: stream the calibration batches through the model and accumulate, for each layer in
scope, statistics in bounded memory (`LayerStats`): input and output ranges (static activation
scales), the input mean (bias correction), and the second moment XᵀX for the layers whose
methods need it (`methods.needs_hessian`: GPTQ, search, Wanda, SparseGPT, EoRA, fine-tuning).

In sequential mode the model is `state.working`, in which earlier blocks are already compressed,
so block i+1 is calibrated on the inputs it will really see (as GPTQ and SparseGPT do).

Padding is not data: when a batch has an `attention_mask` input ([batch, tokens] of 0 and 1,
the Hugging Face convention), the positions it masks out are left out of the statistics of
every Linear (or Embedding) layer whose input is laid out [batch, tokens, ...]. Padded
positions run through the layers but never reach the output; counting them would fit the
weights to filler (in a batch padded to its longest passage, often a third of the positions).

With a cache, a layer's statistics are keyed by the model, the data, the layer and what has been
written into `working` (`state.working_digest`); the model runs only for the layers without an
entry, and stops as soon as the last of them has seen each batch. An entry with XᵀX also serves
a layer that does not need it (the other statistics are the same).
"""

from __future__ import annotations

import contextlib
import sys
from functools import partial
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qspec.compiler.capture import Layer
from qspec.compiler.errors import CompileFailure
from qspec.compiler.histogram import BINS, Histogram
from qspec.compiler.layercache import Entry
from qspec.compiler.resolve import LayerPlan
from qspec.compiler.state import LayerStats, State
from qspec.passes.methods import needs_hessian


def input_rows(layer: Layer, module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
    """The layer's input as rows of its weight matrix's reduction dimension (Conv: unfolded
    patches with input channels innermost), or None when rows do not share one input (grouped
    Conv, Embedding)."""
    if layer.kind == "embedding" or layer.groups != 1:
        return None
    return _patches(layer, module, inputs)


def group_rows(layer: Layer, module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A grouped Conv's input as [rows, groups, cols]: group g's patches are what the output
    channels of group g reduce over (a depthwise conv: one channel's kernel window)."""
    patches = _patches(layer, module, inputs)  # [rows, positions x channels], channels inner
    per_group = layer.weight_shape[1]  # input channels of one group
    positions = layer.cols // per_group  # kernel positions
    grouped = patches.reshape(-1, positions, layer.groups, per_group)
    return grouped.permute(0, 2, 1, 3).reshape(-1, layer.groups, layer.cols)


def _patches(layer: Layer, module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if layer.kind in ("linear", "hf_conv1d"):
        return inputs.reshape(-1, inputs.shape[-1])
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    if layer.kind == "conv1d":
        inputs = inputs.unsqueeze(-2)

    def planar(value: tuple[int, ...]) -> tuple[int, ...]:
        return value if layer.kind == "conv2d" else (1, value[0])

    padding = cast(tuple[int, ...], module.padding)  # unfold takes numbers, not "same"
    patches = F.unfold(  # [N, I*kh*kw, L], channel outermost
        inputs,
        planar(module.kernel_size),
        dilation=planar(module.dilation),
        padding=planar(padding),
        stride=planar(module.stride),
    )
    channels = inputs.shape[1]
    patches = patches.reshape(patches.shape[0], channels, -1, patches.shape[-1])
    return patches.permute(0, 3, 2, 1).reshape(-1, patches.shape[2] * channels)


class _Done(Exception):
    """Raised from a hook once every layer in scope has seen the batch: skip the rest."""


class _NonFinite(Exception):
    """Raised from a hook at the first module whose input or output is NaN or infinite."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def _finite(value: object) -> bool:
    """No NaN or infinity in a tensor, or in the tensors of a tuple or list (other values
    are not activations)."""
    if isinstance(value, tuple | list):
        return all(_finite(item) for item in value)
    return not isinstance(value, torch.Tensor) or bool(torch.isfinite(value).all())


def locate_nonfinite(module: nn.Module, batch: dict[str, torch.Tensor]) -> str:
    """Where `module`'s activations on `batch` first stop being finite (inputs are finite,
    so a layer overflowed): the first module, in execution order, with a NaN or infinite
    input (an operation between modules overflowed) or output."""

    def hook(child, inputs, output, name: str) -> None:
        if not all(_finite(x) for x in inputs):
            raise _NonFinite(f"the input of '{name}' ({type(child).__name__})")
        if not _finite(output):
            raise _NonFinite(f"the output of '{name}' ({type(child).__name__})")

    hooks = [
        child.register_forward_hook(partial(hook, name=name))
        for name, child in module.named_modules()
        if name and not next(child.children(), None)  # leaves: the layers and activations
    ]
    try:
        with torch.no_grad():
            module(**batch)
    except _NonFinite as found:
        return found.where
    finally:
        for handle in hooks:
            handle.remove()
    return "the model's output, after its last layer"


def nonfinite_failure(
    module: nn.Module, batch: dict[str, torch.Tensor], what: str
) -> CompileFailure:
    """The CompileFailure for activations that overflow on finite data."""
    return CompileFailure(
        f"activations become NaN or infinite on {what} (finite data): first at "
        f"{locate_nonfinite(module, batch)}; the model overflows in float32 on this data"
    )


def run(state: State) -> State:
    plans = {n: p for n, p in state.plan.layers.items() if p.compressed or p.bias_correction}
    wanted = plans if state.scope is None else state.scope
    missing = _reuse(state, [name for name in wanted if name in plans])
    scope = list(missing)
    if not scope:
        return state
    module = state.working
    stats = {name: LayerStats() for name in scope}
    modules = dict(module.named_modules())
    seen: set[str] = set()
    hooks = []
    for name in scope:
        layer, plan = state.graph.layers[name], plans[name]
        second_moment, histograms = needs_hessian(plan), needs_histograms(plan)

        def hook(child, inputs, output, name=name, layer=layer, needs=(second_moment, histograms)):
            x = inputs[0].detach()
            if not (_finite(x) and _finite(output)):
                raise _NonFinite(name)
            output = output.detach()
            if layer.kind in TOKEN_KINDS:
                x, output = unpadded(x, mask), unpadded(output, mask)
            _accumulate(stats[name], layer, child, x, output.float(), *needs)
            seen.add(name)
            if len(seen) == len(stats):
                raise _Done

        hooks.append(modules[name].register_forward_hook(hook))
    batches = state.calibration.batches
    mask: torch.Tensor | None = None
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                mask = token_mask(batch)
                seen.clear()
                _progress(state, index, len(batches))
                with contextlib.suppress(_Done):
                    module(**batch)
    except _NonFinite:
        for handle in hooks:  # locating runs the model again, without these hooks
            handle.remove()
        raise nonfinite_failure(module, batch, f"calibration batch {index}") from None
    finally:
        for handle in hooks:
            handle.remove()
        _progress(state, len(batches), len(batches))
    state.stats.update(stats)
    if state.cache is not None:
        for name in scope:
            state.cache.save("stats", missing[name], _entry(stats[name]))
    return state


TOKEN_KINDS = ("linear", "hf_conv1d", "embedding")  # layers whose last dimension is features


def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The batch's real (not padding) token positions, bool [batch, tokens], or None when it
    has no 0/1 `attention_mask` of that layout."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.is_complex():
        return None
    if not bool(((mask == 0) | (mask == 1)).all()):
        return None
    return mask.bool()


def unpadded(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A [batch, tokens, ...] activation without its padded positions ([real tokens, ...]);
    any other activation as it is."""
    if mask is None or value.dim() < 3 or value.shape[:2] != mask.shape or mask.all():
        return value
    return value[mask]


def _reuse(state: State, scope: list[str]) -> dict[str, str]:
    """Put the cached statistics of the layers in scope into `state.stats`; the layers left to
    measure, with their cache keys ("" without a cache)."""
    cache = state.cache
    if cache is None:
        return dict.fromkeys(scope, "")
    missing = {}
    for name in scope:
        key = cache.key("stats", state.working_digest, name)
        layer, plan = state.graph.layers[name], state.plan.layers[name]
        needs = partial(
            _stats, layer=layer, xtx=needs_hessian(plan), histograms=needs_histograms(plan)
        )
        stats = cache.load("stats", key, name, needs)
        if stats is None:
            missing[name] = key
        else:
            state.stats[name] = stats
    return missing


def needs_histograms(plan: LayerPlan) -> bool:
    """Static activation ranges are chosen from value histograms."""
    return plan.activation is not None and not plan.activation.dynamic


HISTOGRAMS = ("input_histogram", "output_histogram")


def _entry(stats: LayerStats) -> Entry:
    arrays = {"input_sum": stats.input_sum, "xtx": stats.xtx}
    meta = {
        "samples": stats.samples,
        "input_min": stats.input_min,
        "input_max": stats.input_max,
        "output_min": stats.output_min,
        "output_max": stats.output_max,
        "xtx": stats.xtx is not None,
    }
    for name in HISTOGRAMS:
        histogram = getattr(stats, name)
        if histogram is not None:
            arrays[name], meta[f"{name}_limit"] = histogram.counts, histogram.limit
    return Entry(meta, {name: array for name, array in arrays.items() if array is not None})


def _stats(entry: Entry, layer: Layer, xtx: bool, histograms: bool) -> LayerStats:
    """The statistics of an entry, without XᵀX or histograms when the layer does not need them
    (as measuring would leave them: the rest is accumulated alike either way); ValueError when
    the entry lacks what the layer needs, or its arrays do not fit the layer."""
    meta, arrays = entry.meta, entry.arrays
    if xtx and not meta["xtx"]:
        raise ValueError("measured without XᵀX")
    if histograms and not all(name in arrays for name in HISTOGRAMS):
        raise ValueError("measured without histograms")
    shapes = {"input_sum": sum_shape(layer), "xtx": (layer.cols, layer.cols)}
    shapes |= dict.fromkeys(HISTOGRAMS, (BINS,))
    for name, shape in shapes.items():
        if name in arrays and (arrays[name].shape, arrays[name].dtype) != (shape, np.float64):
            raise ValueError(f"{name} of another shape")
    found = {
        name: Histogram(float(meta[f"{name}_limit"]), arrays[name])
        for name in HISTOGRAMS
        if histograms
    }
    return LayerStats(
        samples=meta["samples"],
        input_min=meta["input_min"],
        input_max=meta["input_max"],
        output_min=meta["output_min"],
        output_max=meta["output_max"],
        input_sum=arrays.get("input_sum"),
        xtx=arrays.get("xtx") if xtx else None,
        **found,
    )


def sum_shape(layer: Layer) -> tuple[int, ...]:
    """The shape of a layer's input sum: per group for a grouped Conv."""
    return (layer.cols,) if layer.groups == 1 else (layer.groups, layer.cols)


def _accumulate(
    stats: LayerStats, layer: Layer, module, x, output, second_moment: bool, histograms: bool
) -> None:
    stats.output_min = min(stats.output_min, float(output.min()))
    stats.output_max = max(stats.output_max, float(output.max()))
    if histograms:  # the output as the next layer sees it: after its clamping activation
        stats.output_histogram = stats.output_histogram or Histogram()
        stats.output_histogram.add(output.clamp(*layer.clamp) if layer.clamp else output)
    if layer.kind == "embedding":
        return
    x = x.float()
    stats.input_min = min(stats.input_min, float(x.min()))
    stats.input_max = max(stats.input_max, float(x.max()))
    if histograms:
        stats.input_histogram = stats.input_histogram or Histogram()
        stats.input_histogram.add(x)
    if layer.groups != 1:  # the input mean per group (bias correction); no shared XᵀX
        grouped = group_rows(layer, module, x).double()
        total = grouped.sum(0).numpy()
        stats.input_sum = total if stats.input_sum is None else stats.input_sum + total
        stats.samples += grouped.shape[0]
        return
    rows = input_rows(layer, module, x)
    assert rows is not None
    rows64 = rows.double()
    total = rows64.sum(0).numpy()
    stats.input_sum = total if stats.input_sum is None else stats.input_sum + total
    stats.samples += rows.shape[0]
    if second_moment:
        product = (rows64.T @ rows64).numpy()
        stats.xtx = product if stats.xtx is None else stats.xtx + product


def _progress(state: State, done: int, total: int) -> None:
    if sys.stderr.isatty():
        label = f"block {state.block}" if state.block else "calibrate"
        end = "\n" if done == total else ""
        print(f"\r  {label}: {done}/{total} batches", end=end, file=sys.stderr, flush=True)
