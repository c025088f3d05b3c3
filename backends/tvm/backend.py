"""The Apache TVM backend, as the driver sees it."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qspec.backends.tvm import export, modules
from qspec.backends.tvm.runtime import TvmRunner
from qspec.compiler.capture import Graph
from qspec.compiler.qmodel import CompressedLayer, QModel
from qspec.dsl import ir


class TvmBackend:
    name = "tvm"

    def lower(self, compressed: CompressedLayer, original: nn.Module) -> tuple[nn.Module, str]:
        return modules.lower(compressed, original)

    def emit(
        self, graph: Graph, qmodel: QModel, target: ir.Target, stage: Path
    ) -> export.TvmArtifact:
        """Each tvm target in its own folder of the build, named as the target."""
        return export.emit(graph, qmodel, target, stage / target.name)

    def stored_bytes(self, compressed: CompressedLayer, original: nn.Module) -> int:
        return export.stored_bytes(compressed, original)

    def open(self, folder: Path, entry: dict, inputs: list[str], threads: int = 0) -> TvmRunner:
        return TvmRunner(folder, entry, inputs, threads)

    def cuda_available(self) -> bool:
        import tvm

        return bool(tvm.cuda().exist)


BACKEND = TvmBackend()
