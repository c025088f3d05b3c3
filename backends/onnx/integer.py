"""Graph passes that keep a W8A8 model integer from layer to layer in ONNX Runtime.

The exported graph quantizes each static layer's input and a convolution's output, but what the
model does between layers (its ReLU6, a same-padding Pad, a residual Add) still runs on float
tensors between DequantizeLinear and QuantizeLinear, and ONNX Runtime cannot fuse around it.
Each pass below rewrites one such pattern exactly (docs/compile.md, "W8A8 convolutions").
"""

from __future__ import annotations

import numpy as np
import onnx_ir
import onnx_ir.passes.common as common_passes


def keep_integer(model: onnx_ir.Model) -> None:
    graph = model.graph
    _drop_covered_clamps(graph)
    _fold_zero_pads(graph)
    _share_quantized(graph)
    # what computed a dropped clamp's bounds: a reader of a DequantizeLinear output left
    # behind would keep ONNX Runtime from fusing it
    common_passes.RemoveUnusedNodesPass()(model)
    _drop_unused_initializers(graph)


CODE_RANGE = {onnx_ir.DataType.UINT8: (0, 255), onnx_ir.DataType.INT8: (-128, 127)}


def _drop_covered_clamps(graph: onnx_ir.Graph) -> None:
    """Remove each Relu or Clip whose input is a DequantizeLinear output that already lies in
    its range: the identity. A compressed Conv read by a ReLU/ReLU6 alone quantizes its output
    on the range the activation leaves (its grid saturates where the activation clamps), and
    the activation left after it would otherwise stand between two integer convolutions
    (ONNX Runtime's own Clip/Relu-into-Q fusion skips opset 21's QuantizeLinear)."""
    for node in list(graph):
        if node.op_type not in ("Relu", "Clip") or node.domain not in ("", "ai.onnx"):
            continue
        source, output = node.inputs[0], node.outputs[0]
        low, high = _clamp_range(node)
        covered = _dequantized_range(source)
        if (
            source is None
            or covered is None
            or output.is_graph_output()
            or not (low <= covered[0] <= covered[1] <= high)
        ):
            continue
        output.replace_all_uses_with(source)
        graph.remove(node, safe=True)


def _fold_zero_pads(graph: onnx_ir.Graph) -> None:
    """Fold a zero Pad of the spatial axes into the Convs that read it, directly or through one
    QuantizeLinear -> DequantizeLinear pair (exact: the zero point dequantizes to 0). A layer
    subclass's "same" padding (run as a pre-hook) otherwise stands in float between two integer
    convolutions; ONNX Conv takes asymmetric pads."""
    for node in list(graph):
        spatial = _zero_pad(node)
        if spatial is None:
            continue
        convs = _conv_readers(node.outputs[0])
        if not convs or any(
            conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET" for conv in convs
        ):
            continue
        for conv in convs:
            pads = list(conv.attributes.get_ints("pads", [0] * len(spatial)))
            conv.attributes["pads"] = onnx_ir.AttrInt64s(
                "pads", [a + b for a, b in zip(pads, spatial, strict=True)]
            )
        source = node.inputs[0]
        assert source is not None
        node.outputs[0].replace_all_uses_with(source)
        graph.remove(node, safe=True)


def _zero_pad(node: onnx_ir.Node) -> list[int] | None:
    """A constant-zero Pad of a 4-D tensor's two spatial axes only: its pads in Conv's order
    (top, left, bottom, right); None for anything else."""
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or len(node.inputs) > 3:
        return None
    if node.attributes.get_string("mode", "constant") != "constant":
        return None
    amounts = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if amounts is None or (value is not None and _scalar(value) != 0.0):
        return None
    pads = [int(v) for v in amounts.numpy()]
    if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        return None
    return [pads[2], pads[3], pads[6], pads[7]]


def _conv_readers(value: onnx_ir.Value) -> list[onnx_ir.Node]:
    """The Convs reading `value` as their input, directly or through one Q -> DQ pair; empty
    when anything else reads it."""
    convs = []
    for use in value.uses():
        node = use.node
        if node.op_type == "QuantizeLinear" and use.idx == 0:
            readers = [u.node for u in node.outputs[0].uses()]
            if len(readers) != 1 or readers[0].op_type != "DequantizeLinear":
                return []
            uses = list(readers[0].outputs[0].uses())
        else:
            uses = [use]
        if not all(u.node.op_type == "Conv" and u.idx == 0 for u in uses):
            return []
        convs += [u.node for u in uses]
    return convs


def _share_quantized(graph: onnx_ir.Graph) -> None:
    """Where a float tensor is quantized for one reader (QuantizeLinear -> DequantizeLinear,
    a static layer's input) and also added in float to another (the next block's skip
    connection), give that Add the dequantized tensor: ONNX Runtime then fuses it
    (QLinearAdd) instead of leaving a float island between integer convolutions. The Add
    sees the layer's quantization error, which verification measures with the rest; other
    float readers (weight-only layers) keep the float tensor."""
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or len(node.outputs[0].uses()) != 1:
            continue
        dequantize = next(iter(node.outputs[0].uses())).node
        if dequantize.op_type != "DequantizeLinear" or dequantize.inputs[1:] != node.inputs[1:]:
            continue
        source = node.inputs[0]
        assert source is not None
        for use in list(source.uses()):
            if use.node.op_type == "Add" and use.node.domain in ("", "ai.onnx"):
                use.node.replace_input_with(use.idx, dequantize.outputs[0])
    graph.sort()  # a reader may come before the DequantizeLinear it now reads


def _drop_unused_initializers(graph: onnx_ir.Graph) -> None:
    """The constants the passes above orphaned (Clip bounds, Pad amounts)."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def _clamp_range(node: onnx_ir.Node) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, np.inf
    bounds = [*node.inputs[1:3], None, None][:2]
    values = [_scalar(b) if b is not None else None for b in bounds]
    low, high = (d if v is None else v for v, d in zip(values, (-np.inf, np.inf), strict=True))
    return float(low), float(high)


def _dequantized_range(value: onnx_ir.Value | None) -> tuple[float, float] | None:
    """[lowest, highest] a per-tensor DequantizeLinear can output, or None for anything else."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or len(node.inputs) != 3:
        return None
    scale, zero = _scalar(node.inputs[1]), node.inputs[2]
    if scale is None or zero is None or zero.const_value is None or zero.dtype not in CODE_RANGE:
        return None
    if zero.const_value.numpy().size != 1:
        return None
    qmin, qmax = CODE_RANGE[zero.dtype]
    point = int(zero.const_value.numpy().item())
    ends = np.float32(scale) * np.array([qmin - point, qmax - point], dtype=np.float32)
    return float(ends[0]), float(ends[1])


def _scalar(value: onnx_ir.Value | None) -> float | None:
    """A one-element constant's value (None for anything that is not one)."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return float(array.item()) if array.size == 1 else None
