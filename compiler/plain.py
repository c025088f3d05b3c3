"""Make every weight layer a plain torch layer before anything is measured.

qspec compresses calls of nn.Linear, nn.Conv1d/2d and nn.Embedding, and every backend lowers a
layer as that class computes it. Published models subclass them with a forward of their own:
EfficientNet's `Conv2dStaticSamePadding` pads its input ("same" padding as TensorFlow computes
it, asymmetric) and then convolves. Lowered as a plain convolution, the padding would be lost.

A subclass whose forward is "some operations on the input, then the base layer's function of
its own weight and bias" is replaced by the plain layer (same parameters, options taken from
the call) with those operations as a forward pre-hook: the layer keeps its name, calibration
sees the input the convolution sees, and the lowered modules inherit the hook. Any other
forward of its own (one that changes the output, or reads the weight otherwise) leaves the
module as it is, out of the layer table, and reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

BASES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
CALLS: dict[type[nn.Module], set[Callable[..., Any]]] = {
    nn.Linear: {F.linear, torch._C._nn.linear},
    nn.Conv1d: {F.conv1d, torch.conv1d},
    nn.Conv2d: {F.conv2d, torch.conv2d},
}


@dataclass(frozen=True)
class Custom:
    module: str
    reason: str


class InputTransform:
    """A forward pre-hook running the traced operations a subclass applied to its input."""

    def __init__(self, operations: fx.GraphModule):
        self.operations = operations

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.operations(*args),)


def plain_layers(model: nn.Module) -> tuple[list[str], list[Custom]]:
    """Replace each layer subclass with a forward of its own by its plain base (in place) where
    the forward only transforms the input; return the names replaced and, for the others, why
    they stay as they are."""
    replaced, kept = [], []
    for name, module in list(model.named_modules()):
        base = next((b for b in BASES if isinstance(module, b)), None)
        if base is None or type(module).forward is base.forward:
            continue
        plain = _plain(module, base)
        if isinstance(plain, str):
            kept.append(Custom(name, plain))
            continue
        model.set_submodule(name, plain)
        replaced.append(name)
    return replaced, kept


def _plain(module: nn.Module, base: type[nn.Module]) -> nn.Module | str:
    """The plain layer with the input transform as its pre-hook, or why there is none."""
    why = f"its class {type(module).__name__} computes its own forward"
    if base not in CALLS:
        return why
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # not traceable: keep it as it is
        return why
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target in CALLS[base]]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(calls) != 1 or output.args[0] is not calls[0]:
        return why + " (anything but input operations before the layer's own function)"
    call = calls[0]
    source, weight, bias, *options = call.args
    if not _is_attr(weight, "weight") or not (bias is None or _is_attr(bias, "bias")):
        return why + " (it does not apply its own weight and bias)"
    if any(isinstance(o, fx.Node) for o in options) or call.kwargs:
        return why + " (its options are not constants)"
    layer = _rebuilt(module, base, options)
    if source is not next(n for n in graph.nodes if n.op == "placeholder"):
        layer.register_forward_pre_hook(InputTransform(_prefix(module, graph, source)))
    return layer


def _is_attr(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and node.target == name


def _rebuilt(module: nn.Module, base: type[nn.Module], options: list[Any]) -> nn.Module:
    """The base class with the subclass's parameters and the options of its call."""
    weight, bias = module.weight, module.bias
    assert isinstance(weight, nn.Parameter) and (bias is None or isinstance(bias, nn.Parameter))
    return plain_layer(base, weight, bias, options).train(module.training)


def plain_layer(
    base: type[nn.Module], weight: nn.Parameter, bias: nn.Parameter | None, options: Sequence[Any]
) -> nn.Module:
    """`base` (nn.Linear, nn.Conv1d or nn.Conv2d) holding these very parameters, with a
    convolution's call options (stride, padding, dilation, groups; missing ones default)."""
    layer: nn.Module
    if base is nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        defaults: list[Any] = [1, 0, 1, 1]
        stride, padding, dilation, groups = [*options, *defaults[len(options) :]]
        kernel: Any = tuple(weight.shape[2:])  # torch's stubs want a tuple of the class's length
        layer = base(
            weight.shape[1] * groups,
            weight.shape[0],
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
        )
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _prefix(module: nn.Module, graph: fx.Graph, source: fx.Node) -> fx.GraphModule:
    """The traced operations from the input to `source`, as a module of their own."""
    needed, stack = set(), [source]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    prefix = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in needed or node.op == "placeholder":
            copied[node] = prefix.node_copy(node, lambda n: copied[n])
    prefix.output(copied[source])
    return fx.GraphModule(module, prefix)
