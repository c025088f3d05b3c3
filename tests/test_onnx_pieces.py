"""ONNX export by pieces (`backends/onnx/pieces.py`): the skeleton and each layer's piece are
cached by content; an artifact's bytes do not depend on what came from the cache, a damaged
entry is exported again, and a spliced model runs at every size the model takes."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.numpy
import torch
from torch import nn

from qspec.backends.onnx.export import emit
from qspec.compiler.capture import capture, float_matrix
from qspec.compiler.numerics import QuantSpec, quantize
from qspec.compiler.qmodel import CompressedLayer
from qspec.compiler.resolve import LayerPlan, WeightPlan
from qspec.compiler.source import LoadedModel
from qspec.dsl.formats import WEIGHT_FORMATS


class Attention(nn.Module):
    """Three projections of one input (one tensor reaching three pieces), then an output."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))
        self.out = nn.Linear(32, 16)

    def forward(self, x):
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
        return self.out(scores @ self.v(x))


def compressed(graph, formats: dict[str, QuantSpec]) -> dict[str, CompressedLayer]:
    qmodel = {}
    for name, quantizer in formats.items():
        layer, child = graph.layers[name], graph.module.get_submodule(name)
        plan = LayerPlan(layer, WeightPlan(quantizer), None, None, None, False)
        weight = float_matrix(layer, child)
        bias = child.bias.detach().numpy()
        qmodel[name] = CompressedLayer(layer, plan, quantize(weight, quantizer), weight, bias=bias)
    return qmodel


INT4 = QuantSpec(WEIGHT_FORMATS["int4"], "group", 16, symmetric=False)
INT8 = QuantSpec(WEIGHT_FORMATS["int8"], "channel")


@pytest.fixture
def graph():
    torch.manual_seed(0)
    model = LoadedModel(Attention().eval(), {"x": torch.randn(2, 5, 32)}, ("x",), "")
    return capture(model)


def pieces(cache: Path) -> list[Path]:
    return sorted((cache / "layers" / "onnx piece").rglob("*.safetensors"))


def test_an_edit_exports_one_piece_and_the_bytes_match_an_uncached_export(
    graph, tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
):
    formats = dict.fromkeys(["q", "k", "v", "out"], INT4)
    first = emit(graph, compressed(graph, formats), None, tmp_path / "first.onnx")
    assert sorted(first.exported) == ["k", "out", "q", "v"]
    again = emit(graph, compressed(graph, formats), None, tmp_path / "again.onnx")
    assert again.exported == []
    assert first.path.read_bytes() == again.path.read_bytes()
    formats["v"] = INT8
    edited = emit(graph, compressed(graph, formats), None, tmp_path / "edited.onnx")
    assert edited.exported == ["v"]
    monkeypatch.setenv("QSPEC_CACHE_DIR", str(tmp_path / "elsewhere"))
    fresh = emit(graph, compressed(graph, formats), None, tmp_path / "fresh.onnx")
    assert sorted(fresh.exported) == ["k", "out", "q", "v"]
    assert edited.path.read_bytes() == fresh.path.read_bytes()


def test_the_spliced_model_runs_every_size_the_model_takes(graph, tmp_path: Path):
    qmodel = compressed(graph, {"q": INT8, "k": INT8, "v": INT4, "out": INT4})
    artifact = emit(graph, qmodel, None, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32), (4, 9, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = artifact.module(x=x).numpy()
        (got,) = session.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _rewrite(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """An entry as a hostile writer would leave it: sound as a file (its sha256 recorded)."""
    header = {"meta": json.dumps(meta), "fortran": "[]"}
    payload = safetensors.numpy.save(arrays, metadata=header)
    path.write_bytes(payload)
    record = json.loads(path.with_suffix(".json").read_text())
    record.update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    path.with_suffix(".json").write_text(json.dumps(record))


def _meta(path: Path) -> dict:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["meta"])


def test_damaged_or_hostile_entries_are_exported_again(graph, tmp_path: Path, private_cache: Path):
    qmodel = compressed(graph, dict.fromkeys(["q", "k", "v", "out"], INT4))
    clean = emit(graph, qmodel, None, tmp_path / "clean.onnx").path.read_bytes()
    truncated, garbage, malformed, _ = pieces(private_cache)
    truncated.write_bytes(truncated.read_bytes()[:-7])
    _rewrite(garbage, _meta(garbage), {"model": np.frombuffer(b"not a model", np.uint8)})
    _rewrite(malformed, {"provided": "packed", "own": []}, {"model": np.zeros(4, np.uint8)})
    (skeleton,) = (private_cache / "layers" / "onnx skeleton").rglob("*.safetensors")
    meta = _meta(skeleton)
    del meta["slots"]["q"]  # a skeleton without a slot for one layer
    _rewrite(skeleton, meta, {"model": np.frombuffer(b"\x08\x0a", np.uint8)})
    again = emit(graph, qmodel, None, tmp_path / "again.onnx")
    assert len(again.exported) == 3
    assert again.path.read_bytes() == clean
