"""The ONNX Runtime backend, as the driver and allocation see it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from qspec.backends.onnx import export, latency, modules
from qspec.backends.onnx.runtime import OnnxRunner
from qspec.compiler import host
from qspec.compiler.capture import Graph, Layer
from qspec.compiler.errors import UserError
from qspec.compiler.qmodel import CompressedLayer, QModel
from qspec.dsl import ir


class OnnxBackend:
    """Also the cost model of mixed-precision allocation (`compiler.costs.CostModel`): ONNX
    Runtime runs a single layer in a second, so candidates are timed as they will run."""

    name = "onnx"

    def lower(self, compressed: CompressedLayer, original: nn.Module) -> tuple[nn.Module, str]:
        return modules.lower(compressed, original)

    def emit(
        self, graph: Graph, qmodel: QModel, target: ir.Target | None, stage: Path
    ) -> export.OnnxArtifact:
        return export.emit(graph, qmodel, target, stage / export.FILE)

    def stored_bytes(self, compressed: CompressedLayer, original: nn.Module) -> int:
        return export.stored_bytes(compressed, original)

    def open(self, folder: Path, entry: dict, inputs: list[str], threads: int = 0) -> OnnxRunner:
        if entry.get("needs_vnni") and not host.has_vnni():
            raise UserError(
                f"{folder / entry['file']} has signed int8 convolution weights, built for CPUs "
                "with VNNI (avx512_vnni or avx_vnni); ONNX Runtime's u8 x s8 kernels saturate "
                "on this CPU, which has none",
                help="compile the spec on this machine (it then stores unsigned weights)",
            )
        return OnnxRunner(folder / entry["file"], threads, device=entry.get("device", "cpu"))

    def cuda_available(self) -> bool:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()

    def layer_latency(
        self,
        layer: Layer,
        original: nn.Module,
        compressed: CompressedLayer | None,
        input_shape: tuple[int, ...],
        key: str,
    ) -> float:
        return latency.layer_latency(layer.name, layer, original, compressed, input_shape, key)

    def artifact_costs(
        self,
        graph: Graph,
        qmodel: QModel,
        target: ir.Target | None,
        batch: dict[str, torch.Tensor] | None,
    ) -> tuple[int, float | None]:
        with tempfile.TemporaryDirectory() as folder:
            artifact = self.emit(graph, qmodel, target, Path(folder))
            seconds = None if batch is None else latency.session_latency(artifact.path, batch)
            return artifact.total_bytes, seconds


BACKEND = OnnxBackend()
