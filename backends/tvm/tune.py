"""`tune trials N` on CPU targets: each matmul kernel's column tile chosen by measurement.

MetaSchedule was measured first (TVM 0.27 here): at 8 to 64 trials it beat the hand rule on one
kernel by about 10% and lost by about 1.5x on others; it needs apache-tvm-ffi < 0.1.15 (later
ones crash serializing its database), psutil, and a 30 s intrinsics import in every build
worker; and it measures only static shapes, while every qspec kernel has a symbolic row count.
So the search is over the one free parameter of our own rule, the column tile (the row tile is
fixed by the kernel's padding): each candidate that divides the output columns is compiled and
timed on the kernel alone at about SYMBOLIC rows, N timings in all, and
replaces the default only when clearly faster. Choices are kept in the cache folder by target
and kernel, so later builds of the same kernels measure nothing.
"""

from __future__ import annotations

import os

import numpy as np
import tvm
import tvm.sym
import tvm_ffi
from tvm import s_tir, tirx

from qspec.backends.tvm.schedule import COLUMN_TILE, CPUMatmul, reductions
from qspec.compiler.cache import add_entries, cache_dir, read_entries
from qspec.compiler.timing import median_seconds

CANDIDATES = (32, 8, 64)  # besides COLUMN_TILE
SYMBOLIC = 128  # rows (batch x sequence) the kernels are timed at
MARGIN = 0.95


def tune(module: tvm.IRModule, target: tvm.target.Target, trials: int) -> dict[int, int]:
    """Kernel hash -> best column tile, for the kernels the matmul rule schedules. Measured on
    every core, as the runtime runs (TVM reads the thread count at its first parallel kernel)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    path = cache_dir() / "tvm-tuning.json"
    tiles_known = (COLUMN_TILE, *CANDIDATES)  # any other value in the file is not one we wrote
    known = {k: v for k, v in read_entries(path).items() if v in tiles_known and type(v) is int}
    tiles, left = {}, trials
    for _, function in sorted(module.functions.items(), key=lambda item: item[0].name_hint):
        if not isinstance(function, tirx.PrimFunc):
            continue
        if CPUMatmul().apply(function, target, False) is None:
            continue
        kernel = tvm_ffi.structural_hash(function)
        key = f"{target}|{kernel}"
        candidates = _candidates(function, target)
        if key not in known and len(candidates) > 1 and left >= len(candidates):
            timings = {tile: _seconds(function, target, tile) for tile in candidates}
            left -= len(candidates)
            best = min(timings, key=timings.__getitem__)
            # Keep the default unless a candidate is clearly faster: timings of a kernel this
            # short move by a few percent between runs.
            known[key] = best if timings[best] < MARGIN * timings[COLUMN_TILE] else COLUMN_TILE
        if key in known and (known[key] in candidates or known[key] == COLUMN_TILE):
            tiles[kernel] = known[key]
    add_entries(path, known)
    return tiles


def _candidates(function: tirx.PrimFunc, target: tvm.target.Target) -> list[int]:
    """The tiles that divide the kernel's output columns (others would fall back to 8), the
    default first."""
    schedule = s_tir.Schedule(function)
    blocks = schedule.get_child_blocks(schedule.get_sblock("root"))
    matmul = reductions(schedule, blocks)[0]
    columns = schedule.get(schedule.get_loops(matmul)[-2]).extent
    if not isinstance(columns, tirx.IntImm):
        return []
    return [tile for tile in (COLUMN_TILE, *CANDIDATES) if int(columns) % tile == 0]


def _seconds(function: tirx.PrimFunc, target: tvm.target.Target, tile: int) -> float:
    """Median seconds of the kernel scheduled with `tile`, on random inputs."""
    schedule = CPUMatmul({tvm_ffi.structural_hash(function): tile}).apply(function, target, False)
    kernel = tvm.compile(schedule.mod["main"].with_attr("global_symbol", "main"), target=target)
    arguments = _arguments(function)
    return median_seconds(lambda: kernel(*arguments))


def _arguments(function: tirx.PrimFunc) -> list:
    """Random buffers (any bit pattern decodes, small integers index in range); symbolic
    dimensions and scalar parameters sized so that their product is about SYMBOLIC."""
    buffers = [p for p in function.params if type(p.ty).__name__ == "BufferType"]
    scalars = [p for p in function.params if type(p.ty).__name__ != "BufferType"]
    symbols = {v for b in buffers for d in b.shape for v in _variables(d)} | set(scalars)
    # Batch x sequence is a product of symbols: each gets the root that makes it ~SYMBOLIC.
    value = max(1, round(SYMBOLIC ** (1 / max(1, len(symbols)))))
    analyzer = tvm.sym.Analyzer()
    for symbol in symbols:
        analyzer.bind(symbol, tirx.const(value, "int64"))
    rng = np.random.default_rng(0)
    arguments = []
    for parameter in function.params:
        if parameter in scalars:
            arguments.append(value)
            continue
        shape = [int(analyzer.simplify(d)) for d in parameter.shape]
        dtype = str(parameter.dtype)
        data = (
            rng.standard_normal(shape) if dtype.startswith("float") else rng.integers(0, 8, shape)
        )
        arguments.append(tvm.runtime.tensor(data.astype(dtype)))
    return arguments


def _variables(expression) -> list:
    """The variables of a shape expression (sums, products, divisions of them and constants)."""
    if isinstance(expression, tirx.Var):
        return [expression]
    parts = [getattr(expression, name, None) for name in ("a", "b")]
    return [v for part in parts if part is not None for v in _variables(part)]
