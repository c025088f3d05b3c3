"""Lowering pieces every backend shares: the lowered copy of the model, float layers whose
pruned zeros are stored, the error for a setting a backend cannot run, and the low-rank branch
beside a compressed layer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from qspec.compiler.capture import unmatrix, weight_of
from qspec.compiler.errors import UserError
from qspec.compiler.qmodel import CompressedLayer, QModel

Lowering = Callable[[CompressedLayer, nn.Module], tuple[nn.Module, str]]


def lowered_module(module: nn.Module, qmodel: QModel, lower: Lowering) -> tuple[nn.Module, dict]:
    """A copy of the float module with every compressed layer replaced by what a backend's
    `lower` makes of it, and what each became. The layer's forward pre-hooks (the input
    operations capture moved out of a layer subclass) run before the replacement too."""
    module = copy.deepcopy(module)
    emitted: dict[str, str] = {}
    for name, compressed in qmodel.items():
        original = module.get_submodule(name)
        replacement, what = lower(compressed, original)
        for hook in original._forward_pre_hooks.values():
            replacement.register_forward_pre_hook(hook)
        module.set_submodule(name, replacement)
        emitted[name] = what
    return module.eval(), emitted


def sparse_float(compressed: CompressedLayer, original: nn.Module) -> nn.Module:
    """The layer itself with its pruned (and SparseGPT-updated) weight: the zeros are stored."""
    module = copy.deepcopy(original)
    weight = torch.from_numpy(compressed.effective_weight())
    with torch.no_grad():
        weight_of(module).copy_(unmatrix(compressed.layer, weight))
    return module


def unsupported(
    backend: str, compressed: CompressedLayer, field: str, what: str, why: str | None = None
) -> UserError:
    """The error for a setting a backend cannot run, pointing at the rule that set it."""
    return UserError(
        f"target {backend} cannot run {what} on {compressed.layer.name} ({compressed.layer.kind})",
        compressed.plan.sources.get(field) or compressed.plan.sources.get("weight"),
        help=why,
    )


Branch = Callable[[nn.Module, CompressedLayer], nn.Module]


def with_lowrank(
    backend: str,
    compressed: CompressedLayer,
    lowered: tuple[nn.Module, str],
    branch: Branch,
) -> tuple[nn.Module, str]:
    """The lowered layer, with the backend's low-rank branch beside it when the layer has one
    (only Linear layers do)."""
    main, emitted = lowered
    if compressed.lowrank is None:
        return main, emitted
    if compressed.layer.kind not in ("linear", "hf_conv1d"):
        why = "the low-rank branch is emitted for Linear layers"
        raise unsupported(backend, compressed, "lora", "low-rank compensation", why)
    assert compressed.plan.lowrank is not None
    rank, factors = compressed.lowrank[1].shape[0], compressed.plan.lowrank.factors
    return branch(main, compressed), f"{emitted} + low-rank r{rank} ({factors})"
