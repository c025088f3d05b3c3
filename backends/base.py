"""What a backend is: lower compressed layers, emit an artifact, count its bytes, open it.

The driver talks to backends only through these protocols (`qspec.backends.backend(name)`),
so adding a backend is one folder that implements them and one line in the table of
`backends/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from qspec.compiler.capture import Graph
from qspec.compiler.qmodel import CompressedLayer, QModel
from qspec.dsl import ir


class Artifact(Protocol):
    """What `emit` wrote for one target."""

    emitted: dict[str, str]  # layer -> what it became (MatMulNBits, decode in matmul, ...)
    layer_bytes: dict[str, int]  # layer -> bytes of its stored tensors
    module: nn.Module  # the lowered module that was exported (torch reference ops)

    @property
    def total_bytes(self) -> int: ...

    def other_bytes(self) -> int:
        """Stored bytes that belong to no compressed layer."""
        ...

    def entry(self, target: ir.Target, stage: Path) -> dict:
        """The manifest fields of `target`, built as this artifact (files relative to `stage`)."""
        ...


class Runner(Protocol):
    """A built artifact, callable on named numpy arrays."""

    input_names: list[str]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def primary(self, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The first output for a batch of torch tensors (used by verification)."""
        ...


class Backend(Protocol):
    name: str

    def lower(self, compressed: CompressedLayer, original: nn.Module) -> tuple[nn.Module, str]:
        """The module that replaces a compressed layer, and what it runs as."""
        ...

    def emit(self, graph: Graph, qmodel: QModel, target: ir.Target, stage: Path) -> Artifact:
        """Write the target's artifact into the staging folder of a build."""
        ...

    def stored_bytes(self, compressed: CompressedLayer, original: nn.Module) -> int:
        """Bytes the artifact will store for this layer, without emitting it."""
        ...

    def open(self, folder: Path, entry: dict, inputs: list[str], threads: int = 0) -> Runner:
        """A runner for one entry of a manifest's `targets`."""
        ...

    def cuda_available(self) -> bool:
        """Whether this machine can run this backend's CUDA artifacts."""
        ...
