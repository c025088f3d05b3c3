"""Byte-identical libraries from identical inputs.

TVM's `VMShapeLower` writes `shape_func`, the host function that computes symbolic shapes
(rows = batch x sequence, ...) into the VM's shape heap. It orders those stores by walking an
unordered_map keyed by structural hash, which hashes free shape variables by their address, so
the order, and with it the machine code and the linker's build id, followed the heap layout of
the process (measured: three different model.so from four compiles of one spec). The stores
are independent (each reads only shape variables matched before the call, never a slot another
store writes), so putting them in heap-slot order changes no result.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The Relax pipeline `tvm.compile` picks for `target`, then shape functions in one order."""
    if "gpu" in target.keys:
        default = relax.get_default_pipeline(target)
    else:
        default = relax.get_pipeline("default")
    return tvm.transform.Sequential([default, ordered_shape_functions()])


def ordered_shape_functions() -> tvm.transform.Pass:
    """Every `shape_func*` PrimFunc's stores sorted by heap slot."""

    @tvm.transform.module_pass(opt_level=0, name="OrderedShapeFunctions")
    def apply(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        ordered = module.clone()
        for gvar, function in module.functions.items():
            if isinstance(function, tirx.PrimFunc) and gvar.name_hint.startswith("shape_func"):
                ordered.update_func(gvar, function.with_body(_in_slot_order(function.body)))
        return ordered

    return apply


def _in_slot_order(body: tirx.Stmt) -> tirx.Stmt:
    """A sequence of stores at constant heap indices, sorted by index (anything else as is)."""
    if not isinstance(body, tirx.SeqStmt) or not all(map(_is_slot_store, body.seq)):
        return body
    return tirx.SeqStmt(sorted(body.seq, key=lambda store: int(store.indices[0])))


def _is_slot_store(statement: tirx.Stmt) -> bool:
    return (
        isinstance(statement, tirx.BufferStore)
        and len(statement.indices) == 1
        and isinstance(statement.indices[0], tirx.IntImm)
    )
