"""Measured latency: one layer (or the float model) exported as the ONNX backend emits it and
timed in ONNX Runtime, cached on disk by candidate, shapes, threads, runtime and CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qspec.backends.onnx import latency
from qspec.compiler import timing
from qspec.compiler.capture import Layer, matrix
from qspec.compiler.numerics import QuantSpec, quantize
from qspec.compiler.qmodel import CompressedLayer
from qspec.compiler.resolve import LayerPlan
from qspec.dsl.formats import WEIGHT_FORMATS

INT4_G32 = QuantSpec(WEIGHT_FORMATS["int4"], "group", 32, symmetric=False)


def int4_linear(name: str = "fc") -> tuple[Layer, nn.Linear, CompressedLayer]:
    torch.manual_seed(0)
    module = nn.Linear(64, 128).eval()
    layer = Layer(name, "linear", (128, 64), 128 * 64 + 128, 0)
    weight = matrix(layer, module.weight.detach()).numpy()
    plan = LayerPlan(layer, None, None, None, None, False)
    compressed = CompressedLayer(
        layer, plan, quantize(weight, INT4_G32), weight, bias=module.bias.detach().numpy()
    )
    return layer, module, compressed


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of ONNX exports and benchmarks (the real ones still run)."""
    counts = {"emit": 0, "benchmark": 0}

    def counting(name: str, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(latency, "emit", counting("emit", latency.emit))
    monkeypatch.setattr(latency, "session_latency", counting("benchmark", latency.session_latency))
    monkeypatch.setattr(timing, "BUDGET", 0.02)
    return counts


def test_layer_latency_is_measured_once_then_cached(
    counted: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("QSPEC_CACHE_DIR", str(tmp_path / "here"))
    layer, module, compressed = int4_linear()
    key = "int4 group 32 asym rtn"
    seconds = latency.layer_latency("fc", layer, module, compressed, (8, 64), key, threads=1)
    assert isinstance(seconds, float) and 0 < seconds < 0.1
    assert counted == {"emit": 1, "benchmark": 1}
    entries = json.loads((tmp_path / "here" / "latency.json").read_text())
    assert list(entries.values()) == [seconds]
    (entry,) = entries
    assert key in entry and "[128, 64]" in entry and "[8, 64]" in entry

    # the same candidate elsewhere in the model (another name, same shapes) is served from disk
    again = latency.layer_latency("other", layer, module, compressed, (8, 64), key, threads=1)
    assert again == seconds and counted == {"emit": 1, "benchmark": 1}

    # another candidate, input shape or the float layer are measured anew
    latency.layer_latency("fc", layer, module, compressed, (8, 64), "int4 g32 gptq", threads=1)
    latency.layer_latency("fc", layer, module, compressed, (16, 64), key, threads=1)
    latency.layer_latency("fc", layer, module, None, (8, 64), "float", threads=1)
    assert counted == {"emit": 4, "benchmark": 4}
    assert len(json.loads((tmp_path / "here" / "latency.json").read_text())) == 4


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_corrupt_cache_is_an_empty_one(content: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(latency, "emit", lambda *args: None)  # no export: timing is faked
    monkeypatch.setattr(latency, "session_latency", lambda *args, **kwargs: 0.5)
    path = latency.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    layer, module, compressed = int4_linear()
    assert latency.layer_latency("fc", layer, module, compressed, (8, 64), "k") == 0.5
    assert list(json.loads(path.read_text()).values()) == [0.5]
    assert not list(path.parent.glob(".latency-*"))  # no temporary file left behind


@pytest.mark.parametrize("bad", [-1.0, 0.0, 1e300, "0.5", None])
def test_implausible_cached_timings_are_measured_again(bad, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(latency, "emit", lambda *args: None)
    monkeypatch.setattr(latency, "session_latency", lambda *args, **kwargs: 0.5)
    layer, module, compressed = int4_linear()
    latency.layer_latency("fc", layer, module, compressed, (8, 64), "k")
    path = latency.cache_path()
    path.write_text(json.dumps({key: bad for key in json.loads(path.read_text())}))
    monkeypatch.setattr(latency, "session_latency", lambda *args, **kwargs: 0.25)
    assert latency.layer_latency("fc", layer, module, compressed, (8, 64), "k") == 0.25


def test_an_unwritable_cache_only_costs_measuring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("QSPEC_CACHE_DIR", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(latency, "emit", lambda *args: None)
    monkeypatch.setattr(latency, "session_latency", lambda *args, **kwargs: 0.5)
    layer, module, compressed = int4_linear()
    assert latency.layer_latency("fc", layer, module, compressed, (8, 64), "k") == 0.5


def test_cache_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QSPEC_CACHE_DIR", str(tmp_path))
    assert latency.cache_path() == tmp_path / "latency.json"
    monkeypatch.delenv("QSPEC_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert latency.cache_path() == tmp_path / "home" / ".cache" / "qspec" / "latency.json"
