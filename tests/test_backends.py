"""The Backend protocol, for every backend: what it predicts without emitting (stored bytes,
what a layer becomes) is what it emits, and the artifact it opens computes the lowered model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qspec.backends import BACKENDS, backend
from qspec.compiler.capture import capture, float_matrix
from qspec.compiler.numerics import QuantSpec, quantize
from qspec.compiler.qmodel import CompressedLayer
from qspec.compiler.resolve import LayerPlan, LowRankPlan, WeightPlan
from qspec.compiler.source import LoadedModel
from qspec.dsl import ir
from qspec.dsl.formats import WEIGHT_FORMATS


def compressed_model() -> tuple[LoadedModel, dict[str, CompressedLayer]]:
    """Two Linears: int4 groups of 32 with zero points, and int8 channels with an fp16 low-rank
    branch."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    model = LoadedModel(module, {"input": torch.randn(3, 64)}, ("input",), "")
    graph = capture(model)
    quantizers = {
        "0": QuantSpec(WEIGHT_FORMATS["int4"], "group", 32, symmetric=False),
        "2": QuantSpec(WEIGHT_FORMATS["int8"], "channel"),
    }
    qmodel = {}
    for name, quantizer in quantizers.items():
        layer, child = graph.layers[name], module.get_submodule(name)
        lowrank = LowRankPlan(4, "svd", 0, "fp16") if name == "2" else None
        plan = LayerPlan(layer, WeightPlan(quantizer), None, None, lowrank, False)
        weight = float_matrix(layer, child)
        compressed = CompressedLayer(
            layer, plan, quantize(weight, quantizer), weight, bias=child.bias.detach().numpy()
        )
        if lowrank is not None:
            rng = np.random.default_rng(1)
            up, down = rng.standard_normal((layer.rows, 4)), rng.standard_normal((4, layer.cols))
            compressed.lowrank = (up.astype(np.float16), (down / 100).astype(np.float16))
        qmodel[name] = compressed
    return model, qmodel


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_a_backend_predicts_what_it_emits(name: str, tmp_path: Path):
    model, qmodel = compressed_model()
    graph = capture(model)
    chosen, target = backend(name), ir.Target(ir.Word(name))
    artifact = chosen.emit(graph, qmodel, target, tmp_path)
    for layer, compressed in qmodel.items():
        original = model.module.get_submodule(layer)
        assert chosen.stored_bytes(compressed, original) == artifact.layer_bytes[layer]
        assert chosen.lower(compressed, original)[1] == artifact.emitted[layer]
    entry = {"backend": name, "name": target.name} | artifact.entry(target, tmp_path)
    runner = chosen.open(tmp_path, entry, ["input"], threads=1)
    x = model.example["input"]
    with torch.no_grad():
        expected = artifact.module(input=x).numpy()
    np.testing.assert_allclose(runner.primary({"input": x}), expected, rtol=1e-4, atol=1e-4)
