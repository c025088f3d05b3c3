"""Capture the float model and list its compressible layers.

`torch.export` gives the graph and tells which modules the forward pass really calls; when it
fails, `torch.fx.symbolic_trace` is tried. Each compressible layer is described by a `Layer`
whose `matrix` view is the 2-D [rows, reduction] weight every pass and backend works on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path

from qspec.compiler.attention import split_attention
from qspec.compiler.errors import UserError
from qspec.compiler.fold import (
    LAYER_OPS,
    NORM_OPS,
    Folded,
    Unfolded,
    fold_batchnorms,
    module_of,
    strip_prefix,
)
from qspec.compiler.plain import plain_layers
from qspec.compiler.source import LoadedModel
from qspec.dsl import ir

LayerKind = Literal["linear", "conv1d", "conv2d", "embedding", "hf_conv1d"]


@dataclass(frozen=True)
class Layer:
    """A compressible layer. `rows` x `cols` is its weight as a matrix: output channels (or
    embedding rows) by reduction dimension; for Conv the reduction runs over (kernel position,
    input channel) with input channels innermost, so blocks and N:M groups stay in one channel
    run."""

    name: str
    kind: LayerKind
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    groups: int = 1
    # The range of the ReLU / ReLU6 / clamp that alone reads the layer's output (through a
    # folded BatchNorm): static output quantization happens after it, on the range it leaves.
    clamp: tuple[float, float] | None = None

    @property
    def rows(self) -> int:
        return self.weight_shape[1] if self.kind == "hf_conv1d" else self.weight_shape[0]

    @property
    def cols(self) -> int:
        return self.params_in_weight // self.rows

    @property
    def params_in_weight(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def channel_run(self) -> int:
        """Length of a contiguous run of input channels in the matrix view (Conv: per kernel
        position; others: the whole row)."""
        return self.weight_shape[1] if self.kind.startswith("conv") else self.cols


@dataclass(frozen=True)
class Rewritten:
    module: str
    into: str  # what it became


@dataclass(frozen=True)
class LeftFloat:
    module: str
    reason: str


@dataclass
class Graph:
    """The captured model: the float module, its example inputs and compressible layers."""

    module: nn.Module
    example: dict[str, torch.Tensor]
    input_names: tuple[str, ...]
    layers: dict[str, Layer]
    method: Literal["export", "fx"]
    note: str = ""
    # Per input, the axes the model takes other sizes on (exported symbolic; the others fixed)
    free_axes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    folded: list[Folded] = field(default_factory=list)  # BatchNorms absorbed by their layer
    unfolded: list[Unfolded] = field(default_factory=list)  # BatchNorms left in float, why
    rewritten: list[Rewritten] = field(default_factory=list)  # modules made of plain layers
    left_float: list[LeftFloat] = field(default_factory=list)  # weights no layer holds, why


def matrix(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
    """The layer's weight as [rows, cols] (see Layer)."""
    if layer.kind == "hf_conv1d":
        return weight.t()
    if layer.kind.startswith("conv"):
        return weight.movedim(1, -1).reshape(layer.rows, -1)
    return weight.reshape(layer.rows, -1)


def weight_of(module: nn.Module) -> torch.Tensor:
    """A layer module's weight (torch types module attributes as Tensor | Module)."""
    return cast(torch.Tensor, module.weight)


def float_matrix(layer: Layer, module: nn.Module) -> np.ndarray:
    """The module's weight as float32 [rows, cols]: what every pass starts from."""
    return matrix(layer, weight_of(module).detach().float()).numpy()


def unmatrix(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `matrix`: back to the module's own weight layout."""
    if layer.kind == "hf_conv1d":
        return weight.t().contiguous()
    if layer.kind.startswith("conv"):
        out, inp, *kernel = layer.weight_shape
        return weight.reshape(out, *kernel, inp).movedim(-1, 1).contiguous()
    return weight.reshape(layer.weight_shape).contiguous()


def _kind(module: nn.Module) -> LayerKind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers GPT-2 style
        return "hf_conv1d"
    return None


def capture(model: LoadedModel, model_word: ir.Word | None = None) -> Graph:
    module, example = model.module, model.example
    method: Literal["export", "fx"] = "export"
    note = ""
    rewritten, left_float = _plain_modules(module)
    try:
        exported = torch.export.export(module, (), kwargs=example, strict=False)
        used = _modules_called(exported)
    except Exception as error:  # export is strict about Python control flow; fx may still work
        method, note = "fx", f"torch.export failed ({type(error).__name__}: {error})"[:300]
        try:
            traced = torch.fx.symbolic_trace(module)
        except Exception as fx_error:
            raise UserError(
                f"cannot capture the model: {note}; torch.fx also failed ({fx_error})",
                model_word.span if model_word else None,
            ) from None
        used = {n.target for n in traced.graph.nodes if n.op == "call_module"}
        exported = None  # folding reads torch.export's graph: BatchNorms stay float
    folded, unfolded = fold_batchnorms(module, exported) if exported else ([], [])
    clamps = _clamps(exported, {f.norm for f in folded}) if exported else {}
    macs = _macs(module, example)
    layers: dict[str, Layer] = {}
    custom = {entry.module for entry in left_float}
    for name, child in module.named_modules():
        kind = _kind(child)
        if kind is None or name not in used or name in custom:
            continue
        weight = child.weight
        layers[name] = Layer(
            name=name,
            kind=kind,
            weight_shape=tuple(weight.shape),
            params=sum(p.numel() for p in child.parameters(recurse=False)),
            macs=macs.get(name, 0),
            groups=getattr(child, "groups", 1),
            clamp=clamps.get(name),
        )
    free = free_axes(module, example)
    return Graph(
        module,
        example,
        model.input_names,
        layers,
        method,
        note,
        free,
        folded,
        unfolded,
        rewritten,
        left_float,
    )


def _plain_modules(module: nn.Module) -> tuple[list[Rewritten], list[LeftFloat]]:
    """Rewrite layer subclasses and nn.MultiheadAttention into plain layers (in place)."""
    plain, custom = plain_layers(module)
    split, packed = split_attention(module)
    rewritten = [
        Rewritten(name, "its plain layer, the input operations as a pre-hook") for name in plain
    ]
    rewritten += [
        Rewritten(name, "q_proj, k_proj, v_proj, out_proj Linear layers") for name in split
    ]
    left = [LeftFloat(c.module, c.reason) for c in custom]
    return rewritten, left + [LeftFloat(u.module, u.reason) for u in packed]


CLAMPS = {
    torch.ops.aten.relu.default: (0.0, math.inf),
    torch.ops.aten.relu_.default: (0.0, math.inf),
    torch.ops.aten.hardtanh.default: (-1.0, 1.0),  # the defaults; ReLU6 passes (0, 6)
    torch.ops.aten.hardtanh_.default: (-1.0, 1.0),
    torch.ops.aten.clamp.default: (-math.inf, math.inf),
    torch.ops.aten.clamp_.default: (-math.inf, math.inf),
}


def _clamps(
    exported: torch.export.ExportedProgram, folded: set[str]
) -> dict[str, tuple[float, float]]:
    """Layer -> the (low, high) of the clamping activation that is the only reader of its
    output at every call, looking through the BatchNorms folded into it."""
    found: dict[str, tuple[float, float] | None] = {}
    for node in exported.graph_module.graph.nodes:
        layer = module_of(node) if node.target in LAYER_OPS else None
        if layer is None:
            continue
        reader = node
        while len(reader.users) == 1:
            reader = next(iter(reader.users))
            if not (reader.target in NORM_OPS and module_of(reader) in folded):
                break
        bounds = _clamp_bounds(reader) if reader is not node else None
        found[layer] = bounds if found.get(layer, bounds) == bounds else None
    return {layer: bounds for layer, bounds in found.items() if bounds is not None}


def _clamp_bounds(node: torch.fx.Node) -> tuple[float, float] | None:
    """(low, high) of a ReLU, hardtanh (ReLU6) or clamp node; None for anything else."""
    if node.target not in CLAMPS:
        return None
    defaults = CLAMPS[node.target]
    given = [*node.args[1:3], None, None][:2]
    given = [node.kwargs.get(key, value) for key, value in zip(("min", "max"), given, strict=True)]
    low, high = (
        d if g is None else float(cast(float, g)) for g, d in zip(given, defaults, strict=True)
    )
    return (low, high) if low < high else None


def symbolic_axes(graph: Graph) -> dict[str, dict[int, Any]]:
    """torch.export's dynamic_shapes for the graph's inputs: its free axes symbolic (AUTO: a
    size the model pins after all is still fixed), every other axis as in the example."""
    return {
        name: dict.fromkeys(graph.free_axes.get(name, range(t.dim())), torch.export.Dim.AUTO)
        for name, t in graph.example.items()
    }


def free_axes(module: nn.Module, example: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The axes of each input the model runs with at another size: the batch axis always, and
    any other only when the model still runs with it one longer and twice as long (one longer
    alone can vanish in a strided convolution's rounding). Axes of the same size at the same
    position grow together (token ids and their attention mask). A network built for one image
    size (padding computed at construction, a flatten into a Linear) keeps those axes fixed:
    exported symbolic, they would fail at run time on any other size."""
    free = {name: {0} for name, tensor in example.items() if tensor.dim()}
    for axis, size in sorted(
        {(axis, t.shape[axis]) for t in example.values() for axis in range(1, t.dim())}
    ):
        grows = [n for n, t in example.items() if t.dim() > axis and t.shape[axis] == size]
        if all(_runs(module, example, grows, axis, extra) for extra in (1, size)):
            for name in grows:
                free[name].add(axis)
    return {name: tuple(sorted(axes)) for name, axes in free.items()}


def _runs(
    module: nn.Module, example: dict[str, torch.Tensor], grows: list[str], axis: int, extra: int
) -> bool:
    """Whether the model runs with `axis` of the `grows` inputs `extra` longer (the new part
    copied from the start, so token ids stay valid ids)."""
    grown = {
        name: torch.cat([t, t.narrow(axis, 0, 1).repeat_interleave(extra, axis)], axis)
        if name in grows
        else t
        for name, t in example.items()
    }
    try:
        with torch.no_grad():
            module(**grown)
    except Exception:  # the model's own refusal of the size: this axis stays fixed
        return False
    return True


def _modules_called(exported: torch.export.ExportedProgram) -> set[str]:
    """Qualified names of every module on the call stack of some live graph node."""
    graph = exported.graph_module.graph
    graph.eliminate_dead_code()  # a module whose output nothing uses (an unused pooler) is no layer
    called: set[str] = set()
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            called.add(strip_prefix(path))
    return called


def _macs(module: nn.Module, example: dict[str, torch.Tensor]) -> dict[str, int]:
    """Multiply-accumulates of each layer on the example input, from forward hooks."""
    found: dict[str, int] = {}
    hooks = []
    for name, child in module.named_modules():
        kind = _kind(child)
        if kind is None or kind == "embedding":
            continue

        def hook(
            layer: nn.Module,
            _inputs: tuple[Any, ...],
            output: torch.Tensor,
            name: str = name,
            kind: LayerKind = kind,
        ) -> None:
            weight = weight_of(layer)
            if kind in ("linear", "hf_conv1d"):
                found[name] = found.get(name, 0) + output.numel() * (
                    weight.numel() // output.shape[-1]
                )
            else:
                per_output = weight.numel() // weight.shape[0]
                found[name] = found.get(name, 0) + output.numel() * per_output

        hooks.append(child.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(**example)
    finally:
        for handle in hooks:
            handle.remove()
    return found


def primary_tensor(output: object) -> torch.Tensor:
    """The first tensor of whatever the model returns (tensor, tuple, dict, ModelOutput)."""
    leaves, _ = tree_flatten(output)
    return next(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def output_tensors(output: object) -> list[tuple[str, torch.Tensor]]:
    """Every tensor the model returns, named by its place (`output`, `output[1]`,
    `output['logits']`), in the order the ONNX exporter flattens them: so verification can
    score each output, not only the first."""
    leaves, _ = tree_flatten_with_path(output)
    return [
        (f"output{keystr(path)}", leaf) for path, leaf in leaves if isinstance(leaf, torch.Tensor)
    ]
