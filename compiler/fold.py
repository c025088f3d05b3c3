"""Fold BatchNorm into the Conv or Linear layer that feeds it, before anything is measured.

In inference a BatchNorm is a per-channel affine map, y = s * (x - mean) + beta with
s = gamma / sqrt(var + eps), so after a layer computing W x + b it can be absorbed exactly:

    W' = s * W (per output channel),    b' = s * (b - mean) + beta.

Every deployment toolkit does this before quantizing: quantizing the unfolded W rounds the wrong
weights (s can scale a channel by 100x), and leaves a float BatchNorm in the integer path. A
BatchNorm is folded only where the exported graph shows that it reads the output of one layer
call that nothing else reads, over that layer's output channels; any other stays float and is
reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

NORM_OPS = {torch.ops.aten.batch_norm.default}
LAYER_OPS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.linear.default,
}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Folded:
    layer: str
    norm: str


@dataclass(frozen=True)
class Unfolded:
    norm: str
    reason: str


def fold_batchnorms(
    module: nn.Module, exported: torch.export.ExportedProgram
) -> tuple[list[Folded], list[Unfolded]]:
    """Fold every foldable BatchNorm of `module` (in place: its layer takes the affine map and
    the BatchNorm becomes an Identity); `exported` is `module`'s graph."""
    folded, unfolded = [], []
    calls = _calls_per_module(exported)
    for node in exported.graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in NORM_OPS:
            continue
        norm_name = module_of(node)
        reason = _why_not(module, node, norm_name, calls)
        if reason:
            unfolded.append(Unfolded(norm_name or str(node.name), reason))
            continue
        layer_name = module_of(node.args[0])
        assert norm_name is not None and layer_name is not None
        _fold(module.get_submodule(layer_name), module.get_submodule(norm_name))
        module.set_submodule(norm_name, nn.Identity())
        folded.append(Folded(layer_name, norm_name))
    return folded, unfolded


def _why_not(
    module: nn.Module, node: torch.fx.Node, norm_name: str | None, calls: dict[str, int]
) -> str | None:
    """Why this BatchNorm call cannot be folded, or None when it can."""
    source = node.args[0]
    layer_name = module_of(source) if isinstance(source, torch.fx.Node) else None
    if norm_name is None or not isinstance(module.get_submodule(norm_name), NORMS):
        return "a functional batch_norm, not a BatchNorm module"
    norm = module.get_submodule(norm_name)
    if calls.get(norm_name, 0) != 1:
        return "the BatchNorm is called more than once"
    if not norm.track_running_stats or norm.running_mean is None:
        return "it normalizes with batch statistics (no running mean and variance)"
    if not isinstance(source, torch.fx.Node) or source.target not in LAYER_OPS or not layer_name:
        return "no Conv or Linear layer right before it"
    layer = module.get_submodule(layer_name)
    if not isinstance(layer, LAYERS):
        return f"'{layer_name}' is not a Conv or Linear module"
    if calls.get(layer_name, 0) != 1 or len(source.users) != 1:
        return f"the output of '{layer_name}' is used elsewhere too (or it is called again)"
    value = source.meta.get("val")
    if isinstance(layer, nn.Linear) and (value is None or value.dim() != 2):
        return "BatchNorm after a Linear normalizes its output channels only on [batch, features]"
    return None


def _fold(layer: nn.Module, norm: nn.Module) -> None:
    """W' = s W, b' = s (b - mean) + beta, computed in float64."""
    weight = _tensor(layer, "weight")
    assert weight is not None
    mean, var = _tensor(norm, "running_mean"), _tensor(norm, "running_var")
    assert mean is not None and var is not None
    mean, var = mean.double(), var.double()
    bias, gamma, beta = (
        _tensor(m, name) for m, name in ((layer, "bias"), (norm, "weight"), (norm, "bias"))
    )
    eps = float(cast(float, norm.eps))
    scale = (gamma.double() if gamma is not None else 1.0) / torch.sqrt(var + eps)
    shift = beta.double() if beta is not None else 0.0
    old_bias = bias.double() if bias is not None else torch.zeros_like(mean)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    layer.weight = nn.Parameter((weight.double() * scale.reshape(shape)).to(weight.dtype))
    layer.bias = nn.Parameter((scale * (old_bias - mean) + shift).to(weight.dtype))


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """A module's parameter or buffer, detached (None where it has none: no bias, no affine)."""
    value = getattr(module, name, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def module_of(node: torch.fx.Node) -> str | None:
    """The qualified name of the innermost module a graph node was called in."""
    stack = node.meta.get("nn_module_stack") or {}
    return strip_prefix(list(stack.values())[-1][0]) if stack else None


def _calls_per_module(exported: torch.export.ExportedProgram) -> dict[str, int]:
    """How many times each module is called: its distinct call sites in the module stacks."""
    sites: dict[str, set[str]] = {}
    for node in exported.graph_module.graph.nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            sites.setdefault(strip_prefix(path), set()).add(key)
    return {name: len(keys) for name, keys in sites.items()}


def strip_prefix(path: str) -> str:
    """nn_module_stack paths look like 'L__self__.bert.encoder' or 'bert.encoder'."""
    for prefix in ("L['self'].", "L__self__.", "self."):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path
