"""Emit the ONNX artifact: swap compressed layers for their lowered modules, export them by
pieces (`pieces.py`), share what layers have in common, keep W8A8 integer between layers, fix
the model up for every ONNX Runtime (IR version, opsets) and check it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir
import torch

from qspec.backends.lowering import lowered_module
from qspec.backends.onnx.integer import keep_integer
from qspec.backends.onnx.modules import lower
from qspec.backends.onnx.pieces import export_by_pieces, narrow_of, optimize
from qspec.compiler.capture import Graph
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
    needs_vnni: bool = False  # signed int8 convolution weights (see modules.QDQLayer)
    exported: list[str] = field(default_factory=list)  # layers whose piece was not cached

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
    exported = export_by_pieces(graph, qmodel, module, opset_of(target))
    spliced = onnx_ir.from_proto(exported.model)
    optimize(spliced, qmodel)  # across the seams: what no piece could fold or share alone
    keep_integer(spliced)
    model = onnx_ir.to_proto(spliced)
    model.ir_version = IR_VERSION
    model.producer_name, model.producer_version = "qspec", ""
    _strip_metadata(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise CompileFailure(f"the ONNX model does not check: {error}") from error
    data = model.SerializeToString(deterministic=True)
    path.write_bytes(data)
    signed = any(_signed_weights(module.get_submodule(name)) for name in qmodel)
    layer_bytes = _layer_bytes(model, qmodel)
    return OnnxArtifact(path, emitted, layer_bytes, len(data), module, signed, exported.exported)


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


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and cached shapes: on a small model they are
    most of the file, and ONNX Runtime recomputes shapes anyway."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in (*model.graph.input, *model.graph.output):
        del value.metadata_props[:]
    del model.graph.value_info[:]


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
    narrow = narrow_of(module)
    return sum(
        -(-tensor.numel() // 2) if name in narrow else tensor.numel() * tensor.element_size()
        for name, tensor in module.state_dict().items()
    )


def _nbytes(tensor: onnx.TensorProto) -> int:
    return onnx.numpy_helper.to_array(tensor).nbytes
