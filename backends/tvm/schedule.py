"""Schedules: what turns the legalized Relax module into fast kernels.

TVM's default llvm pipeline schedules nothing (MiniLM runs ~40x slower than ONNX Runtime) and
dlight's CPU rules cover only GEMV and reductions, so two rules of our own come first:

- `CPUMatmul`: any kernel with one matmul-like reduction (dense, batched, the packed-weight
  linear and conv kernels). Output columns are tiled by the vector width x 4, rows by 4, the
  reduction runs innermost over a register block, the column tiles run in parallel; a `decode`
  stage is computed once per column tile (the weight stays packed in memory), other producers are
  inlined and epilogues (bias, residual add, gelu) fused into the store.
- `CPUElementwise`: injective kernels parallelized and vectorized.

On CUDA the dlight GPU rules schedule everything.
"""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax, s_tir, tirx, topi
from tvm.s_tir import dlight as dl

COLUMN_TILE = 32
ROW_TILE = 4
REDUCE = 2  # IterVar.CommReduce


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _reductions(sch: s_tir.Schedule, blocks) -> list:
    return [b for b in blocks if any(int(v.iter_type) == REDUCE for v in sch.get(b).iter_vars)]


class CPUMatmul(dl.ScheduleRule):
    """Register-blocked, vectorized, parallel schedule for kernels with one reduction over one
    axis whose result is [..., rows, columns]."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        reductions = _reductions(sch, blocks)
        if len(reductions) != 1:
            return None
        matmul = reductions[0]
        reduce_vars = [v for v in sch.get(matmul).iter_vars if int(v.iter_type) == REDUCE]
        if len(reduce_vars) != 1 or len(sch.get(matmul).reads) < 2:
            return None
        decode = [b for b in sch.get_producers(matmul) if sch.get(b).name_hint == "decode"]
        for block in sch.get_producers(matmul):
            if sch.get(block).name_hint != "decode":
                _try(sch.compute_inline, block)
        while (consumers := sch.get_consumers(matmul)) and _try(
            sch.reverse_compute_inline, consumers[0]
        ):
            pass
        *spatial, columns, k = sch.get_loops(matmul)
        if not spatial:
            return None
        rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if _static(sch.get(columns).extent) is None:
            # Symbolic columns (attention scores): a split would put a predicate on the vector
            # lanes (measured 100x slower); LLVM vectorizes the short static reduction instead.
            sch.parallel(rows)
            return sch
        # Symbolic rows are not split either: the predicate in the register block costs more
        # than the blocking gains (measured 6.8 ms against 4.4 ms on a 128 x 384 x 1536 layer).
        width = _tile(sch.get(columns).extent, COLUMN_TILE)
        height = _tile(sch.get(rows).extent, ROW_TILE)
        column_tiles, column = sch.split(columns, [None, width])
        row_tiles, row = sch.split(rows, [None, height])
        if decode:  # decode a [K, width] slab of the weight once per column tile
            sch.reorder(column_tiles, row_tiles, k, row, column)
            sch.compute_at(decode[0], column_tiles)
            sch.vectorize(sch.get_loops(decode[0])[-1])
            sch.parallel(column_tiles)
        else:
            sch.reorder(row_tiles, column_tiles, k, row, column)
            sch.parallel(sch.fuse(row_tiles, column_tiles))
        if height > 1:
            sch.unroll(row)
        if width > 1:
            sch.vectorize(column)
        sch.decompose_reduction(matmul, k)
        return sch


def _tile(extent, preferred: int) -> int:
    """The largest of preferred, 8, 1 that divides a static extent (1 for a symbolic one)."""
    size = _static(extent)
    if size is None:
        return 1
    return next(t for t in (preferred, 8, 1) if size % t == 0)


def _try(primitive, block) -> bool:
    try:
        primitive(block)
    except s_tir.ScheduleError:
        return False
    return True


class CPUElementwise(dl.ScheduleRule):
    """Injective kernels: producers inlined, the output's loops fused, split by 8, parallel
    outside and vectorized inside."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if not blocks or _reductions(sch, blocks):
            return None
        for block in blocks[:-1]:
            _try(sch.compute_inline, block)
        output = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        loops = sch.get_loops(output)
        if not loops:
            return None
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        if _static(sch.get(fused).extent) is not None and int(sch.get(fused).extent) % 8 == 0:
            outer, inner = sch.split(fused, [None, 8])
            sch.parallel(outer)
            sch.vectorize(inner)
        else:
            sch.parallel(fused)
        return sch


def _fast_gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """gelu with a polynomial erf: libm's erff does not vectorize (12 ms of MiniLM's 66)."""
    return bb.call_te(
        lambda x: x * 0.5 * (1.0 + topi.fast_erf(x * 0.7071067811865476)),
        call.args[0],
        primfunc_name_hint="gelu",
    )


def lower_passes(target: tvm.target.Target) -> tvm.transform.Pass:
    """Legalize, fuse and schedule, ready for `tvm.compile` (which leaves scheduled kernels)."""
    if target.kind.name == "cuda":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
        rules.append(dl.gpu.Fallback())
        legalize = None
    else:
        rules = [CPUMatmul(), dl.cpu.GEMV(), dl.cpu.Reduction(), CPUElementwise()]
        legalize = {"relax.nn.gelu": _fast_gelu}
    return tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.LegalizeOps(customize_legalize_map=legalize),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
            dl.ApplyDefaultSchedule(*rules),
        ]
    )


def build_library(relax_module: tvm.IRModule, target: dict, library: Path) -> list[str]:
    """Schedule and compile for `target`, export the library; the names of its kernels."""
    compiled_for = tvm.target.Target(target)
    with compiled_for:  # nvcc reads the CUDA architecture from the current target
        scheduled = lower_passes(compiled_for)(relax_module)
        executable = tvm.compile(scheduled, target=compiled_for)
    executable.export_library(str(library))
    functions = scheduled.functions.items()
    return sorted(gv.name_hint for gv, f in functions if isinstance(f, tirx.PrimFunc))
