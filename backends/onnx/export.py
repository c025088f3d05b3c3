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
from qspec.backends.onnx.integer import keep_integer
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
    needs_vnni: bool = False  # signed int8 convolution weights (see modules.QDQLayer)

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
    keep_integer(program.model.graph)
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
