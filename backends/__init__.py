"""The backends, by the name a spec's `target` gives: each imported only when used."""

from __future__ import annotations

from importlib import import_module

from qspec.backends.base import Backend
from qspec.compiler.costs import CostModel

BACKENDS = {"onnx": "qspec.backends.onnx.backend", "tvm": "qspec.backends.tvm.backend"}


def backend(name: str) -> Backend:
    """The backend a target names (`onnx`, `tvm`)."""
    return import_module(BACKENDS[name]).BACKEND


def cost_model() -> CostModel:
    """What mixed-precision allocation prices candidates with: ONNX Runtime, which every spec
    can emit and which times one layer in about a second."""
    from qspec.backends.onnx.backend import BACKEND as onnx

    return onnx
