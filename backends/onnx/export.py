"""Emit the ONNX artifact: swap compressed layers for their lowered modules, export with the
dynamo exporter and the custom translations, and fix the model up for every ONNX Runtime
(IR version, opsets), then check it."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import onnxscript.optimizer
import torch
from torch.utils._pytree import tree_flatten

from qspec.backends.lowering import lowered_module
from qspec.backends.onnx.modules import lower
from qspec.backends.onnx.ops import TABLE
from qspec.compiler.capture import Graph, symbolic_axes
from qspec.compiler.errors import CompileFailure
from qspec.compiler.folder import sha256_file
from qspec.compiler.qmodel import CompressedLayer, QModel
from qspec.dsl import ir

DEFAULT_OPSET = 21
FILE = "model.onnx"
IR_VERSION = 10  # onnxruntime-gpu 1.31 rejects IR 14 (onnx 1.23's default); opset 21 needs 10


@dataclass
class OnnxArtifact:
    path: Path
    emitted: dict[str, str]  # layer -> what it became (MatMulNBits, decode+Conv, ...)
    layer_bytes: dict[str, int]  # layer -> bytes of its initializers in the file
    total_bytes: int
    module: torch.nn.Module  # the lowered module that was exported (torch reference ops)
    needs_vnni: bool = False  # signed int8 convolution weights (see modules.signed_int8_kernels)

    def entry(self, target: ir.Target, stage: Path) -> dict:
        return {
            "device": target.device.text if target.device else "cpu",
            "opset": opset_of(target),
            "file": self.path.name,
            "bytes": self.total_bytes,
            "sha256": sha256_file(self.path),
            "needs_vnni": self.needs_vnni,
        }

    def other_bytes(self) -> int:
        """Bytes of the file's initializers that belong to no compressed layer."""
        model = onnx.load(str(self.path))
        owned = tuple(f"{name}." for name in self.layer_bytes)
        return sum(
            onnx.numpy_helper.to_array(t).nbytes
            for t in model.graph.initializer
            if not t.name.startswith(owned)
        )


def emit(graph: Graph, qmodel: QModel, target: ir.Target | None, path: Path) -> OnnxArtifact:
    module, emitted = lowered_module(graph.module, qmodel, lower)
    opset = opset_of(target)
    dynamic = symbolic_axes(graph)
    try:
        with _quiet():
            program = torch.onnx.export(
                module,
                (),
                kwargs=graph.example,
                dynamo=True,
                dynamic_shapes=dynamic,
                custom_translation_table=TABLE,
                opset_version=opset,
                optimize=False,
                external_data=False,
                output_names=_output_names(module, graph.example),
            )
    except Exception as error:
        raise CompileFailure(f"ONNX export failed: {type(error).__name__}: {error}") from error
    assert program is not None
    _narrow(program.model, _narrow_types(module, qmodel))
    _optimize(program.model, prefixes=tuple(f"{name}." for name in qmodel))
    _drop_covered_clamps(program.model.graph)
    _fold_zero_pads(program.model.graph)
    _share_quantized(program.model.graph)
    _drop_unused_initializers(program.model.graph)
    model = program.model_proto
    model.ir_version = IR_VERSION
    model.producer_name, model.producer_version = "qspec", ""
    _strip_metadata(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString(deterministic=True)
    path.write_bytes(data)
    signed = any(_signed_weights(module.get_submodule(name)) for name in qmodel)
    return OnnxArtifact(path, emitted, _layer_bytes(model, qmodel), len(data), module, signed)


def _signed_weights(lowered: torch.nn.Module) -> bool:
    """A static integer convolution holding signed int8 weights (u8 x s8 kernels)."""
    codes = getattr(lowered, "codes", None)
    static = getattr(lowered, "input_scale", None) is not None
    return (
        static
        and getattr(lowered, "conv", False)
        and codes is not None
        and codes.dtype == torch.int8
    )


def opset_of(target: ir.Target | None) -> int:
    return int(target.opset.value) if target and target.opset else DEFAULT_OPSET


def _optimize(model: onnx_ir.Model, prefixes: tuple[str, ...]) -> None:
    """The exporter's cleanup and constant folding, except for nodes that read a compressed
    layer's packed tensors: folding those would store the decoded float weight in the file."""

    def should_fold(node: onnx_ir.Node) -> bool | None:
        for value in node.inputs:
            if (
                value is not None
                and value.is_initializer()
                and (value.name or "").startswith(prefixes)
            ):
                return False
        return None

    with _quiet():
        onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)


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


def _narrow_types(module: torch.nn.Module, qmodel: QModel) -> dict[str, np.dtype]:
    """Initializer name -> the 4-bit type a lowered module holds one code per byte of."""
    types = {}
    for name in qmodel:
        for buffer, dtype in getattr(module.get_submodule(name), "narrow", {}).items():
            types[f"{name}.{buffer}"] = np.dtype(dtype)
    return types


def _narrow(model: onnx_ir.Model, types: dict[str, np.dtype]) -> None:
    """Store those initializers as INT4/UINT4, two codes per byte (low nibble first): torch has
    no 4-bit dtype, so the exported graph carries them as int8/uint8 until here. Done before
    the optimizer, whose initializer deduplication compares types."""
    initializers = model.graph.initializers
    missing = sorted(set(types) - set(initializers))
    if missing:
        raise CompileFailure(f"ONNX export lost the 4-bit initializers {', '.join(missing)}")
    for name, dtype in types.items():
        value = initializers[name]
        assert value.const_value is not None
        value.const_value = onnx_ir.tensor(value.const_value.numpy().astype(dtype), name=name)
        value.dtype = onnx_ir.DataType.from_numpy(dtype)


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and cached shapes: on a small model they are
    most of the file, and ONNX Runtime recomputes shapes anyway."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in (*model.graph.input, *model.graph.output):
        del value.metadata_props[:]
    del model.graph.value_info[:]


def _output_names(module: torch.nn.Module, example: dict[str, torch.Tensor]) -> list[str]:
    with torch.no_grad():
        leaves, _ = tree_flatten(module(**example))
    count = sum(isinstance(leaf, torch.Tensor) for leaf in leaves)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress and warns about optional packages: keep the CLI clean."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


def _layer_bytes(model: onnx.ModelProto, qmodel: QModel) -> dict[str, int]:
    """Bytes of each compressed layer's initializers: every tensor under its name (the lowered
    module's own buffers and those of nested ones, such as a low-rank branch's factors)."""
    sizes = {name: 0 for name in qmodel}
    for tensor in model.graph.initializer:
        parts = tensor.name.split(".")
        owner = next(
            (
                ".".join(parts[:i])
                for i in range(len(parts) - 1, 0, -1)
                if ".".join(parts[:i]) in sizes
            ),
            None,
        )
        if owner is not None:
            sizes[owner] += len(tensor.raw_data) or _nbytes(tensor)
    return sizes


def stored_bytes(compressed: CompressedLayer, original: torch.nn.Module) -> int:
    """The bytes `_layer_bytes` will find for this layer, predicted from its lowered module
    without exporting (4-bit codes counted two to a byte, as `_narrow` stores them)."""
    module, _ = lower(compressed, original)
    narrow = getattr(module, "narrow", {})
    return sum(
        -(-tensor.numel() // 2) if name in narrow else tensor.numel() * tensor.element_size()
        for name, tensor in module.state_dict().items()
    )


def _nbytes(tensor: onnx.TensorProto) -> int:
    return onnx.numpy_helper.to_array(tensor).nbytes
