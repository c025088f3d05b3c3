"""Export by pieces: the model with an opaque slot where each compressed layer goes (the
skeleton) and each layer's lowered module on its own (a piece), exported apart and spliced.

Why: the exporter is most of an emit, and an edit to a spec usually reaches few layers. The
skeleton depends on the float model and on which layers are compressed, not on how; a piece on
its own lowered module alone. Both are kept in the per-layer cache by content
(`compiler.layercache`), so the rebuild after a one-layer edit exports one small piece. Entries
hold graphs, not weights: an initializer that is a module's tensor, stored as that tensor is,
stays out of the entry and comes from the module when spliced (always, cached or not: an
artifact's bytes never depend on the cache).

Pieces missing from the cache are exported together, as the outputs of one module (`_Bank`):
each export has a fixed price of a second or more.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Any, cast

import ml_dtypes
import numpy as np
import onnx
import onnx_ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import onnxscript.rewriter
import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten

from qspec.backends.lowering import lowered_module
from qspec.backends.onnx import ops
from qspec.compiler.capture import Graph, Layer, symbolic_axes, weight_of
from qspec.compiler.errors import CompileFailure
from qspec.compiler.layercache import (
    Entry,
    LayerCache,
    backend_environment,
    digest,
    module_digest,
    module_structure,
    open_module_cache,
)
from qspec.compiler.qmodel import QModel

Dims = list[int | None]  # an input's sizes, None where symbolic
SUBGRAPHS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
Tensors = Mapping[str, Callable[[], onnx.TensorProto]]  # name -> how to build its initializer


@dataclass
class Exported:
    """A spliced model, and the pieces this export made rather than found in the cache."""

    model: onnx.ModelProto
    exported: list[str]


def export_by_pieces(graph: Graph, qmodel: QModel, lowered: nn.Module, opset: int) -> Exported:
    """One ONNX graph of the model with each compressed layer as in `lowered` (the float module
    with the lowered modules in place, from `lowered_module`)."""
    cache = open_module_cache(graph.module, graph.example)
    key = _key(cache, "onnx skeleton", opset, sorted(qmodel), graph.free_axes)
    skeleton = _load(cache, "onnx skeleton", key, ("slots", "provided"))
    if skeleton is None or set(skeleton.meta["slots"]) != set(qmodel):
        skeleton = _export_skeleton(graph, qmodel, opset)
        _save(cache, "onnx skeleton", key, skeleton)
    slots: dict[str, dict] = skeleton.meta["slots"]
    modules = {name: lowered.get_submodule(name) for name in qmodel}
    keys = {
        name: _key(cache, "onnx piece", opset, module_digest(module), slots[name])
        for name, module in modules.items()
    }
    cached = {name: _load(cache, "onnx piece", keys[name], ("provided", "own")) for name in modules}
    missing = [name for name, piece in cached.items() if piece is None]
    fresh = _export_by_structure({n: modules[n] for n in missing}, graph, slots, opset)
    for name, piece in fresh.items():
        _save(cache, "onnx piece", keys[name], piece)
    pieces = {name: cached[name] or fresh[name] for name in modules}
    model = _splice(_model(skeleton), pieces)
    _attach(model.graph, "", skeleton.meta["provided"], _tensors(graph.module, {}))
    for name, module in modules.items():
        provided = pieces[name].meta["provided"]
        _attach(model.graph, f"{name}.", provided, _tensors(module, narrow_of(module)))
    # one order whichever were cached: kept in an entry or built from the module
    model.graph.initializer.sort(key=lambda tensor: tensor.name)
    return Exported(model, missing)


# ---- the skeleton ------------------------------------------------------------------------------


class _Slot(nn.Module):
    """Stands for a compressed layer in the skeleton."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qspec.layer_slot(x, self.layer)


def _export_skeleton(graph: Graph, qmodel: QModel, opset: int) -> Entry:
    named = {id(compressed): name for name, compressed in qmodel.items()}
    module, _ = lowered_module(graph.module, qmodel, lambda c, _: (_Slot(named[id(c)]), "slot"))
    outputs = {
        name: _output_like(c.layer, graph.module.get_submodule(name)) for name, c in qmodel.items()
    }
    with _slot_outputs(outputs):
        program = export(
            module,
            (),
            graph.example,
            symbolic_axes(graph),
            opset,
            _output_names(graph.module, graph.example),
        )
    optimize(program.model)  # before reading the slots: it drops their output types
    # symbols export found a single value for (a layer fixes its input's channels)
    ranges = program.exported_program.range_constraints
    fixed = {str(s): int(r.lower) for s, r in ranges.items() if r.is_int and r.lower == r.upper}
    slots = {}
    for node in program.model.graph:
        if node.domain == ops.SLOT_DOMAIN:
            layer = node.attributes.get_string("layer")
            node.outputs[0].dtype = _ONNX_FLOATS[weight_of(graph.module.get_submodule(layer)).dtype]
            shape = node.inputs[0].shape
            assert shape is not None
            dims = [dim if isinstance(dim, int) else fixed.get(str(dim)) for dim in shape]
            slots[layer] = {
                "dims": dims,
                "dtype": node.inputs[0].dtype.value,
            }
    model = program.model_proto
    provided = _detach(model.graph, _tensors(graph.module, {}))
    return Entry({"slots": slots, "provided": provided}, {"model": _bytes(model)})


def _output_like(layer: Layer, original: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's output for a fake input, computed as the layer would (so that export learns
    what sizes the layer fixes), on an empty weight of the layer's shape."""
    weight = weight_of(original)
    if layer.kind == "embedding":
        return lambda x: x.new_empty((*x.shape, weight.shape[1]), dtype=weight.dtype)
    if layer.kind.startswith("conv"):
        conv = cast(Callable[..., torch.Tensor], original._conv_forward)
        return lambda x: conv(x, x.new_empty(weight.shape), None)
    return lambda x: F.linear(x, x.new_empty((layer.rows, layer.cols)))


@contextmanager
def _slot_outputs(outputs: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    ops.slot_outputs.update(outputs)
    try:
        yield
    finally:
        ops.slot_outputs.clear()


# ---- the pieces --------------------------------------------------------------------------------


class _Bank(nn.Module):
    """Several lowered layers side by side, to export them in one go. Their `forward` is called
    directly: a layer's input operations (pre-hooks) belong to the skeleton."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(layer.forward(x) for layer, x in zip(self.layers, xs, strict=True))


def _export_pieces(
    modules: dict[str, nn.Module],
    examples: dict[str, torch.Tensor],
    slots: dict[str, dict],
    opset: int,
) -> dict[str, Entry]:
    names = list(modules)
    dims: list[Dims] = [slots[name]["dims"] for name in names]
    inputs = tuple(_sized(examples[name], d) for name, d in zip(names, dims, strict=True))
    dynamic = tuple({axis: Dim.AUTO for axis, size in enumerate(d) if size is None} for d in dims)
    bank = _Bank([modules[name] for name in names]).eval()
    output_names = [f"y{i}" for i in range(len(names))]
    # Axes of equal length get one symbol by default, and a piece would read its sizes off
    # another piece's input.
    with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
        program = export(bank, (inputs,), {}, (dynamic,), opset, output_names)
    narrow = {
        f"layers.{i}.{buffer}": dtype
        for i, name in enumerate(names)
        for buffer, dtype in narrow_of(modules[name]).items()
    }
    _narrow(program.model, narrow)
    for name, d, value in zip(names, dims, program.model.graph.inputs, strict=True):
        shape = value.shape
        assert shape is not None
        if any(size is None and isinstance(dim, int) for size, dim in zip(d, shape, strict=True)):
            raise CompileFailure(f"ONNX export of {name} fixed an input size the model varies")
    _optimize_locally(program.model)
    model = program.model_proto
    entries = {}
    for i, (name, graph) in enumerate(zip(names, _split(model.graph), strict=True)):
        module = modules[name]
        state = _tensors(module, narrow_of(module))
        _canonical(graph, f"layers.{i}.", state.keys())
        own = sorted({tensor.name for tensor in graph.initializer} & state.keys())
        provided = _detach(graph, state)
        piece = onnx.helper.make_model(graph, opset_imports=model.opset_import)
        piece.functions.extend(model.functions)
        entries[name] = Entry({"provided": provided, "own": own}, {"model": _bytes(piece)})
    return entries


def _canonical(graph: onnx.GraphProto, prefix: str, state: Iterable[str]) -> None:
    """Name a piece's nodes, values and constants by position: its bytes must not depend on the
    layers it was exported beside (the exporter numbers names across the whole bank). The
    module's own tensors (`prefix + name` in the bank) keep their names in the module."""
    names = {graph.input[0].name: "x", graph.output[0].name: "y"}
    names |= {prefix + name: name for name in state}
    for tensor in graph.initializer:
        names.setdefault(tensor.name, f"c{len(names)}")
    for index, node in enumerate(graph.node):
        if any(attribute.type in SUBGRAPHS for attribute in node.attribute):
            raise CompileFailure(f"ONNX export of a layer made control flow ({node.op_type})")
        node.name = f"n{index}"
        for name in node.output:
            if name:
                names.setdefault(name, f"v{len(names)}")
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]
    for tensor in graph.initializer:
        tensor.name = names[tensor.name]
    for value in (*graph.input, *graph.output):
        value.name = names[value.name]
        value.type.tensor_type.ClearField("shape")


def _export_by_structure(
    modules: dict[str, nn.Module], graph: Graph, slots: dict[str, dict], opset: int
) -> dict[str, Entry]:
    """The pieces of `modules`, exported once per structure: a layer whose lowered module an
    exporter cannot tell from another's (the same types and settings, tensors of the same
    shapes, the same input) takes that one's graph, provided every tensor in it comes from the
    module (else it is exported too). MiniLM's 36 layers have four structures."""
    if not modules:  # every piece was cached: no model run, no export
        return {}
    groups: dict[str, list[str]] = {}
    for name, module in modules.items():
        groups.setdefault(digest(module_structure(module), slots[name]), []).append(name)
    examples = _layer_inputs(graph, list(modules))
    entries = _export_pieces({g[0]: modules[g[0]] for g in groups.values()}, examples, slots, opset)
    alone = []
    for first, *others in groups.values():
        shared = entries[first].meta["provided"] == entries[first].meta["own"]
        for name in others:
            if shared:
                entries[name] = entries[first]
            else:
                alone.append(name)
    if alone:
        entries |= _export_pieces({n: modules[n] for n in alone}, examples, slots, opset)
    return entries


def _sized(example: torch.Tensor, dims: Dims) -> torch.Tensor:
    """A new tensor like the example with every symbolic axis at least 2 long: export fixes
    axes of length 0/1, and takes one tensor given twice (q, k and v read the same input) as
    one input."""
    sizes = [max(2, s) if d is None else s for s, d in zip(example.shape, dims, strict=True)]
    if sizes == list(example.shape):
        return example.clone()
    if example.is_floating_point():
        return torch.randn(sizes, dtype=example.dtype)
    return torch.zeros(sizes, dtype=example.dtype)


def _layer_inputs(graph: Graph, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """What each layer receives (after its input operations) when the model runs the example."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple, __: object) -> None:
            seen.setdefault(name, args[0])

        return hook

    handles = [graph.module.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            graph.module(**graph.example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _split(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """A bank's graph as one graph per (input, output) pair: the nodes each output needs."""
    producer = {name: node for node in graph.node for name in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    inputs = {value.name for value in graph.input}
    pieces = []
    for x, y in zip(graph.input, graph.output, strict=True):
        needed: set[int] = set()
        stack = [y.name]
        while stack:
            node = producer.get(stack.pop())
            if node is None or id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(_reads(node))
        nodes = [node for node in graph.node if id(node) in needed]
        read = {name for node in nodes for name in _reads(node)}
        if read & inputs - {x.name}:
            raise CompileFailure("ONNX export mixed two layers' pieces")
        used = [initializers[name] for name in sorted(read & initializers.keys())]
        pieces.append(onnx.helper.make_graph(nodes, "piece", [x], [y], used))
    return pieces


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads, also from inside its subgraphs."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs] if attribute.type in SUBGRAPHS else ():
            for inner in graph.node:
                names.extend(_reads(inner))
    return names


# ---- splicing ----------------------------------------------------------------------------------


def _splice(skeleton: onnx.ModelProto, pieces: Mapping[str, Entry]) -> onnx.ModelProto:
    """The skeleton with each slot node replaced by its layer's piece: the piece's values
    renamed `layer/value`, its initializers `layer.name`, its input and output those of the
    slot."""
    graph = skeleton.graph
    nodes: list[onnx.NodeProto] = []
    domains = {o.domain: o for o in skeleton.opset_import if o.domain != ops.SLOT_DOMAIN}
    functions = {(f.domain, f.name, f.overload): f for f in skeleton.functions}
    for node in graph.node:
        if node.domain != ops.SLOT_DOMAIN:
            nodes.append(node)
            continue
        layer = onnx.helper.get_node_attr_value(node, "layer").decode()
        piece = _model(pieces[layer])
        inner = piece.graph
        rename = {inner.input[0].name: node.input[0], inner.output[0].name: node.output[0]}
        for name in pieces[layer].meta["own"]:  # the layer's tensors; constants get a "/"
            rename[name] = f"{layer}.{name}"

        def renamed(name: str, layer: str = layer, rename: dict = rename) -> str:
            return rename.get(name, f"{layer}/{name}") if name else name

        for inner_node in inner.node:
            inner_node.input[:] = [renamed(name) for name in inner_node.input]
            inner_node.output[:] = [renamed(name) for name in inner_node.output]
            inner_node.name = f"{layer}/{inner_node.name}"
            nodes.append(inner_node)
        for tensor in inner.initializer:
            tensor.name = renamed(tensor.name)
            graph.initializer.append(tensor)
        domains.update({o.domain: o for o in piece.opset_import})
        functions.update({(f.domain, f.name, f.overload): f for f in piece.functions})
    del graph.node[:]
    graph.node.extend(nodes)
    del skeleton.opset_import[:]
    skeleton.opset_import.extend(domains.values())
    del skeleton.functions[:]
    skeleton.functions.extend(functions.values())
    return skeleton


# ---- initializers that are module tensors ------------------------------------------------------

_ONNX_FLOATS = {
    torch.float32: onnx_ir.DataType.FLOAT,
    torch.float16: onnx_ir.DataType.FLOAT16,
    torch.bfloat16: onnx_ir.DataType.BFLOAT16,
}
_ML_DTYPES = {
    torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
}


def narrow_of(module: nn.Module) -> dict[str, np.dtype]:
    """Buffer name -> the 4-bit type a lowered module holds one code per byte of, also those of
    the modules nested in it (a low-rank branch's main layer)."""
    return {
        f"{path}.{buffer}" if path else buffer: np.dtype(dtype)
        for path, sub in module.named_modules()
        for buffer, dtype in getattr(sub, "narrow", {}).items()
    }


def _tensors(
    module: nn.Module, narrow: Mapping[str, np.dtype]
) -> dict[str, Callable[[], onnx.TensorProto]]:
    """Name -> how to build the TensorProto of each of a module's tensors."""

    def builder(name: str, value: torch.Tensor) -> Callable[[], onnx.TensorProto]:
        return lambda: _tensor(name, value, narrow.get(name))

    return {name: builder(name, value) for name, value in module.state_dict().items()}


def _tensor(name: str, value: torch.Tensor, narrow: np.dtype | None) -> onnx.TensorProto:
    value = value.detach().cpu().contiguous()
    if value.dtype in _ML_DTYPES:
        carrier, dtype = _ML_DTYPES[value.dtype]
        array = value.view(carrier).numpy().view(dtype)
    else:
        array = value.numpy()
    return onnx.numpy_helper.from_array(array.astype(narrow) if narrow else array, name)


def _detach(graph: onnx.GraphProto, tensors: Tensors) -> list[str]:
    """Leave out of `graph` each initializer that `tensors[its name]` builds with the same
    type, shape and bytes; the names left out."""
    kept, provided = [], []
    for tensor in graph.initializer:
        build = tensors.get(tensor.name)
        if build is not None and _same(build(), tensor):
            provided.append(tensor.name)
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return provided


def _attach(
    graph: onnx.GraphProto,
    prefix: str,
    names: Sequence[str],
    tensors: Tensors,
) -> None:
    for name in names:
        if name not in tensors:
            raise CompileFailure(f"the cached ONNX graph needs {prefix}{name}, which is gone")
        tensor = tensors[name]()
        tensor.name = prefix + name
        graph.initializer.append(tensor)


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    return (
        a.data_type == b.data_type
        and list(a.dims) == list(b.dims)
        and bool(a.raw_data)
        and a.raw_data == b.raw_data
    )


# ---- export and the cache ----------------------------------------------------------------------


def export(
    module: nn.Module,
    args: tuple,
    kwargs: dict[str, torch.Tensor],
    dynamic: dict[str, Any] | tuple[Any, ...],
    opset: int,
    output_names: list[str],
):
    """torch.onnx.export (dynamo) with qspec's translations, unoptimized, quietly."""
    try:
        with _quiet():
            program = torch.onnx.export(
                module,
                args,
                kwargs=kwargs,
                dynamo=True,
                dynamic_shapes=dynamic,
                custom_translation_table=ops.TABLE,
                opset_version=opset,
                optimize=False,
                external_data=False,
                output_names=output_names,
            )
    except Exception as error:
        raise CompileFailure(f"ONNX export failed: {type(error).__name__}: {error}") from error
    assert program is not None
    return program


def optimize(model: onnx_ir.Model, layers: Iterable[str] = ()) -> None:
    """The exporter's cleanup, constant folding and sharing (equal initializers stored once,
    equal subexpressions computed once), except on nodes that read the tensors of `layers`:
    folding those would store a decoded float weight in the file."""
    prefixes = tuple(f"{name}." for name in layers)

    def should_fold(node: onnx_ir.Node) -> bool | None:
        layer_tensors = (v for v in node.inputs if v is not None and v.is_initializer())
        return False if any((v.name or "").startswith(prefixes) for v in layer_tensors) else None

    with _quiet():
        onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)


def _optimize_locally(model: onnx_ir.Model) -> None:
    """Constant folding and the exporter's rewrites, node by node, as `optimize` does, but not
    across pieces (no shared initializers or subexpressions: a piece stands alone) and not on
    nodes that read the layers' tensors (folding those would store decoded float weights)."""

    def should_fold(node: onnx_ir.Node) -> bool | None:
        layer_tensors = (v for v in node.inputs if v is not None and v.is_initializer())
        return False if any((v.name or "").startswith("layers.") for v in layer_tensors) else None

    with _quiet():
        onnxscript.optimizer.fold_constants(model, should_fold=should_fold)
        onnxscript.rewriter.rewrite(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)


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


def _output_names(module: nn.Module, example: dict[str, torch.Tensor]) -> list[str]:
    with torch.no_grad():
        leaves, _ = tree_flatten(module(**example))
    count = sum(isinstance(leaf, torch.Tensor) for leaf in leaves)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress and warns about optional packages: keep the CLI clean."""
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _key(cache: LayerCache | None, kind: str, opset: int, *parts: object) -> str:
    return cache.key(kind, backend_environment(), opset, *parts) if cache else ""


def _load(cache: LayerCache | None, kind: str, key: str, fields: tuple[str, ...]) -> Entry | None:
    """A cached entry whose model parses and whose meta has `fields`, or None."""

    def check(entry: Entry) -> Entry:
        try:
            _model(entry)
        except Exception as error:  # whatever a damaged protobuf raises
            raise ValueError("not an ONNX model") from error
        if not _well_formed(entry.meta, fields):
            raise ValueError("malformed entry")
        return entry

    return cache.load(kind, key, kind, check) if cache else None


def _well_formed(meta: dict, fields: tuple[str, ...]) -> bool:
    """Whether an entry's meta has `fields` with the types this module writes."""
    names = [meta.get(field) for field in fields if field != "slots"]
    if not all(isinstance(n, list) and all(isinstance(s, str) for s in n) for n in names):
        return False
    slots = meta.get("slots")
    return "slots" not in fields or (
        isinstance(slots, dict)
        and all(
            isinstance(slot, dict)
            and isinstance(slot.get("dtype"), int)
            and isinstance(slot.get("dims"), list)
            and all(d is None or isinstance(d, int) for d in slot["dims"])
            for slot in slots.values()
        )
    )


def _save(cache: LayerCache | None, kind: str, key: str, entry: Entry) -> None:
    if cache is not None:
        cache.save(kind, key, entry)


def _model(entry: Entry) -> onnx.ModelProto:
    return onnx.load_model_from_string(entry.arrays["model"].tobytes())


def _bytes(model: onnx.ModelProto) -> np.ndarray:
    return np.frombuffer(model.SerializeToString(deterministic=True), dtype=np.uint8)
