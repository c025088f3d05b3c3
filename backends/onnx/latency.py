"""Measured latency costs for mixed-precision allocation.

A candidate's latency is what ONNX Runtime on this machine takes to run the layer alone,
lowered exactly as the ONNX backend emits it (MatMulNBits, DequantizeLinear fp8, decode+MatMul,
a low-rank branch...): FLOP or byte counts cannot tell a fused kernel from an in-graph decode.
One export and benchmark takes about a second, so results are cached on disk by everything
that decides them: the caller's description of the candidate, the layer, the input shape, the
thread count, the ONNX Runtime version, the CPU and the backend's lowering code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from qspec.backends.onnx import modules, ops
from qspec.backends.onnx.export import emit
from qspec.backends.onnx.runtime import OnnxRunner
from qspec.compiler.cache import add_entries, cache_dir, read_entries
from qspec.compiler.capture import Graph, Layer
from qspec.compiler.host import cpu_name
from qspec.compiler.qmodel import CompressedLayer
from qspec.compiler.timing import median_seconds

MAX_SECONDS = 60.0  # no single layer takes longer: a cached timing beyond it is not trusted


class _Alone(nn.Module):
    """The layer as the only submodule, `layer`: the name emit lowers it under."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def layer_latency(
    name: str,
    layer: Layer,
    original: nn.Module,
    compressed: CompressedLayer | None,
    input_shape: tuple[int, ...],
    key: str,
    *,
    threads: int = 0,
) -> float:
    """Median seconds of one run of this layer alone (lowered exactly as the ONNX backend emits
    it, or the float layer when compressed is None) in an ONNX Runtime session, on a float32
    input of input_shape (for embeddings: int64 indices of that shape). Cached on disk by `key`
    (the caller's description of the candidate, e.g. 'int4 group 32 asym gptq') together with
    the layer kind, weight shape, module settings (bias, stride, padding, groups), input shape,
    threads, onnxruntime version and CPU. `name` (the layer's name in the model) only names
    the temporary file: layers alike share one measurement."""

    def measure() -> float:
        generator = torch.Generator().manual_seed(0)
        if layer.kind == "embedding":
            x = torch.randint(0, layer.rows, input_shape, generator=generator)
        else:
            x = torch.randn(input_shape, generator=generator)
        alone = dataclasses.replace(layer, name="layer")
        graph = Graph(_Alone(original), {"x": x}, ("x",), {"layer": alone}, "export")
        qmodel = {} if compressed is None else {"layer": compressed}
        with tempfile.TemporaryDirectory(prefix="qspec-latency-") as folder:
            path = Path(folder) / f"{name.replace('/', '_')}.onnx"
            emit(graph, qmodel, None, path)
            return session_latency(path, {"x": x}, threads=threads)

    parts = ["layer", key, layer.kind, layer.weight_shape, repr(original), input_shape]
    return _cached(parts, threads, measure)


def session_latency(path: Path, batch: dict[str, torch.Tensor], *, threads: int = 0) -> float:
    """Median seconds of session.run on an ONNX file, uncached (for artifacts that exist once)."""
    runner = OnnxRunner(path, threads=threads)
    feed = {name: batch[name].numpy() for name in runner.input_names}
    return median_seconds(lambda: runner.session.run(None, feed))


def _cached(parts: list, threads: int, measure: Callable[[], float]) -> float:
    """The cached value for parts plus this machine's runtime, else measure and store it."""
    machine = [threads, onnxruntime.__version__, cpu_name(), os.cpu_count(), _lowering()]
    entry = json.dumps([*parts, *machine])
    path = cache_path()
    value = read_entries(path).get(entry)
    if isinstance(value, float) and 0.0 < value < MAX_SECONDS:  # a bad entry is measured again
        return value
    value = measure()
    add_entries(path, {entry: value})
    return value


def cache_path() -> Path:
    return cache_dir() / "latency.json"


@functools.cache
def _lowering() -> str:
    """A digest of the ONNX backend's lowering code: a qspec that emits differently measures
    again instead of reading timings of kernels it no longer emits."""
    digest = hashlib.sha256()
    for module in (modules, ops):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()[:16]
