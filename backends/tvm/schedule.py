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
import tvm.sym
import tvm_ffi
from tvm import relax, s_tir, tirx, topi
from tvm.s_tir import dlight as dl

from qspec.backends.tvm.kernels import ROW_TILE
from qspec.backends.tvm.reproducible import relax_pipeline

COLUMN_TILE = 16  # 4 x 16 float32 accumulators: 8 of AVX2's 16 vector registers
REDUCE = 2  # IterVar.CommReduce


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def reductions(sch: s_tir.Schedule, blocks) -> list:
    """The blocks that reduce over some axis."""
    return [b for b in blocks if any(int(v.iter_type) == REDUCE for v in sch.get(b).iter_vars)]


class CPUMatmul(dl.ScheduleRule):
    """Register-blocked, vectorized, parallel schedule for kernels with one reduction over one
    axis whose result is [..., rows, columns]. The column tile is COLUMN_TILE unless `tiles`
    (structural hash of the kernel -> tile, from `tune`) says otherwise."""

    def __init__(self, tiles: dict[int, int] | None = None):
        self.tiles = tiles or {}

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        preferred = self.tiles.get(tvm_ffi.structural_hash(func), COLUMN_TILE)
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        reducing = reductions(sch, blocks)
        if len(reducing) != 1:
            return None
        matmul = reducing[0]
        reduce_vars = [v for v in sch.get(matmul).iter_vars if int(v.iter_type) == REDUCE]
        if len(reduce_vars) != 1 or len(sch.get(matmul).reads) < 2:
            return None
        decode = [b for b in sch.get_producers(matmul) if sch.get(b).name_hint == "decode"]
        for block in sch.get_producers(matmul):
            if sch.get(block).name_hint != "decode":
                _try(sch.compute_inline, block)
        tail = _inline_consumers(sch, matmul)
        *spatial, columns, k = sch.get_loops(matmul)
        if not spatial:
            return None
        rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if _static(sch.get(columns).extent) is None:
            # Symbolic columns (attention scores): a split would put a predicate on the vector
            # lanes (measured 100x slower); LLVM vectorizes the short static reduction instead.
            sch.parallel(rows)
            return sch
        # Rows are blocked only when the block provably divides them (the packed kernels pad
        # them): a predicate in the register block costs more than the blocking gains (measured
        # 6.8 ms against 4.4 ms unblocked on a 128 x 384 x 1536 layer).
        width = _tile(sch.get(columns).extent, preferred)
        height = _tile(sch.get(rows).extent, ROW_TILE)
        column_tiles, column = sch.split(columns, [None, width])
        row_tiles, row = sch.split(rows, [None, height])
        # `block`: the loop under which one register block of the result is complete.
        if decode:  # decode a [K, width] slab of the weight once per column tile
            sch.reorder(column_tiles, row_tiles, k, row, column)
            sch.compute_at(decode[0], column_tiles)
            sch.vectorize(sch.get_loops(decode[0])[-1])
            sch.parallel(column_tiles)
            block = row_tiles
        else:
            sch.reorder(row_tiles, column_tiles, k, row, column)
            block = sch.fuse(row_tiles, column_tiles)
            sch.parallel(block)
        if height > 1:
            sch.unroll(row)
        if width > 1:
            sch.vectorize(column)
        sch.decompose_reduction(matmul, k)
        if tail is not None:  # the store of the real rows, per register block
            sch.reverse_compute_at(tail, block)
            _try(sch.vectorize, sch.get_loops(tail)[-1])  # not where it stores channels first
        return sch


def _tile(extent, preferred: int) -> int:
    """The largest of preferred, 8, 1 that divides the extent (provably, when symbolic)."""
    divides = tvm.sym.Analyzer().can_prove
    return next(t for t in (preferred, 8, 1) if divides(tirx.floormod(extent, t) == 0))


def _inline_consumers(sch: s_tir.Schedule, block) -> object | None:
    """Fold the epilogue (bias, fused elementwise ops) into the block's store; when the first
    consumer cannot be (it stores a part of a padded result) fold the rest into it and return
    it."""
    while consumers := sch.get_consumers(block):
        if not _try(sch.reverse_compute_inline, consumers[0]):
            tail = consumers[0]
            while (after := sch.get_consumers(tail)) and _try(sch.reverse_compute_inline, after[0]):
                pass
            return tail
    return None


def _try(primitive, target) -> bool:
    """Apply a schedule primitive to a block or loop if it is legal there."""
    try:
        primitive(target)
    except s_tir.ScheduleError:
        return False
    return True


class CPURows(dl.ScheduleRule):
    """Row-wise reductions (softmax, layer norm): every block computed inside one parallel loop
    over the rows, each inner loop left whole so LLVM vectorizes it (dlight's CPU reduction
    rule splits symbolic rows into predicated vectors: measured 6x slower on softmax)."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if not reductions(sch, blocks):
            return None
        output = blocks[-1]
        loops = sch.get_loops(output)
        if len(loops) < 2 or reductions(sch, [output]):
            return None
        rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        for block in reversed(blocks[:-1]):
            if not _try_at(sch, block, rows):
                return None
        sch.parallel(rows)
        return sch


def _try_at(sch: s_tir.Schedule, block, loop) -> bool:
    try:
        sch.compute_at(block, loop, preserve_unit_loops=False)
    except s_tir.ScheduleError:
        return _try(sch.compute_inline, block)
    return True


class CPUElementwise(dl.ScheduleRule):
    """Injective kernels: producers inlined; the innermost loop, when static, vectorized by 8
    (index arithmetic once per vector, not per element), every loop outside it fused and run in
    parallel."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if not blocks or reductions(sch, blocks):
            return None
        for block in blocks[:-1]:
            _try(sch.compute_inline, block)
        output = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        loops = sch.get_loops(output)
        if not loops:
            return None
        *outer, inner = loops
        if _static(sch.get(inner).extent) is not None and _tile(sch.get(inner).extent, 8) == 8:
            rest, lanes = sch.split(inner, [None, 8])
            sch.vectorize(lanes)
            outer.append(rest)
        if outer:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return sch


def _fast_gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """gelu with a polynomial erf: libm's erff does not vectorize (12 ms of MiniLM's 66)."""
    return bb.call_te(
        lambda x: x * 0.5 * (1.0 + topi.fast_erf(x * 0.7071067811865476)),
        call.args[0],
        primfunc_name_hint="gelu",
    )


def fusion_passes(target: tvm.target.Target) -> tvm.transform.Pass:
    """Legalize to TIR and fuse: the kernels the schedule rules then see."""
    cpu = target.kind.name != "cuda"
    return tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            *([relax.transform.FastMathTransform()] if cpu else []),
            relax.transform.LegalizeOps(
                customize_legalize_map={"relax.nn.gelu": _fast_gelu} if cpu else None
            ),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            # Before scheduling, which would hide the pattern: reshapes become views, not copies
            # (with symbolic shapes, a copy with a division per element).
            relax.transform.RewriteDataflowReshape(),
            relax.transform.DeadCodeElimination(),
        ]
    )


def schedule_pass(target: tvm.target.Target, tiles: dict[int, int] | None = None):
    """Every kernel scheduled; `tiles` (kernel hash -> column tile) from `tune`."""
    if target.kind.name == "cuda":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
        return dl.ApplyDefaultSchedule(*rules, dl.gpu.Fallback())
    matmul = CPUMatmul(tiles or {})
    rules = [matmul, CPURows(), dl.cpu.GEMV(), dl.cpu.Reduction(), CPUElementwise()]
    return dl.ApplyDefaultSchedule(*rules)


def build_library(
    relax_module: tvm.IRModule, target: dict, library: Path, trials: int = 0
) -> list[str]:
    """Fuse, tune (with `trials`), schedule and compile for `target`, export the library; the
    names of its kernels."""
    from qspec.backends.tvm.tune import tune

    compiled_for = tvm.target.Target(target)
    with compiled_for:  # nvcc reads the CUDA architecture from the current target
        fused = fusion_passes(compiled_for)(relax_module)
        tiles = tune(fused, compiled_for, trials) if trials else {}
        scheduled = schedule_pass(compiled_for, tiles)(fused)
        pipeline = relax_pipeline(compiled_for)
        executable = tvm.compile(scheduled, target=compiled_for, relax_pipeline=pipeline)
    executable.export_library(str(library))
    functions = scheduled.functions.items()
    return sorted(gv.name_hint for gv, f in functions if isinstance(f, tirx.PrimFunc))
