"""What a candidate costs on the target it will run on, as mixed-precision allocation asks it.

Allocation (a pass) must not import a backend; the driver hands it an object with these
methods (the ONNX backend is one), so the bytes and times it optimises are those of the
kernels the build will really emit."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from qspec.compiler.capture import Graph, Layer
from qspec.compiler.qmodel import CompressedLayer, QModel
from qspec.dsl import ir


class CostModel(Protocol):
    def stored_bytes(self, compressed: CompressedLayer, original: nn.Module) -> int:
        """Bytes the artifact stores for the layer compressed so."""
        ...

    def layer_latency(
        self,
        layer: Layer,
        original: nn.Module,
        compressed: CompressedLayer | None,
        input_shape: tuple[int, ...],
        key: str,
    ) -> float:
        """Median seconds of the layer alone (float when `compressed` is None) on an input of
        `input_shape`; `key` describes the candidate for caches."""
        ...

    def artifact_costs(
        self,
        graph: Graph,
        qmodel: QModel,
        target: ir.Target | None,
        batch: dict[str, torch.Tensor] | None,
    ) -> tuple[int, float | None]:
        """Bytes of the whole artifact emitted for `qmodel`, and its median seconds on `batch`
        (None without a batch)."""
        ...
