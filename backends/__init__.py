"""The backends, by the name a spec's `target` gives: each imported only when used."""

from __future__ import annotations

from importlib import import_module

from qspec.backends.base import Backend

BACKENDS = {"onnx": "qspec.backends.onnx.backend", "tvm": "qspec.backends.tvm.backend"}


def backend(name: str) -> Backend:
    """The backend a target names (`onnx`, `tvm`)."""
    return import_module(BACKENDS[name]).BACKEND
