"""Real CNNs: BatchNorm folding (exact where the graph allows it, reported where it does not)
and input sizes exported symbolic only where the model takes other sizes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
from projects import write_project
from torch import nn

from qspec.cli import main
from qspec.compiler.capture import free_axes
from qspec.compiler.fold import Folded, fold_batchnorms


def _randomized(norm: nn.Module) -> nn.Module:
    """A BatchNorm with running statistics and affine parameters far from the identity."""
    generator = torch.Generator().manual_seed(len(norm.running_mean))
    count = len(norm.running_mean)
    norm.running_mean.copy_(torch.rand(count, generator=generator) * 4 - 2)
    norm.running_var.copy_(torch.rand(count, generator=generator) * 3 + 0.01)
    if norm.affine:
        norm.weight.data.copy_(torch.rand(count, generator=generator) * 8 - 4)
        norm.bias.data.copy_(torch.rand(count, generator=generator) - 0.5)
    return norm


class Foldable(nn.Module):
    """conv2d -> BN2d, conv1d (no bias) -> BN1d without affine, Linear -> BN1d on [N, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.bn = _randomized(nn.BatchNorm2d(8))
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_dw = _randomized(nn.BatchNorm2d(8))
        self.conv1d = nn.Conv1d(8, 6, 1, bias=False)
        self.bn1d = _randomized(nn.BatchNorm1d(6, affine=False))
        self.fc = nn.Linear(6, 5)
        self.bn_fc = _randomized(nn.BatchNorm1d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_dw(self.depthwise(x)))
        x = self.bn1d(self.conv1d(x.flatten(2))).mean(2)
        return self.bn_fc(self.fc(x))


class Unfoldable(nn.Module):
    """BatchNorms that must stay: after a ReLU, after a conv whose output is also used, called
    twice, with batch statistics, and after a Linear on [N, L, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.after_relu = _randomized(nn.BatchNorm2d(4))
        self.shared_conv = nn.Conv2d(4, 4, 1)
        self.after_shared = _randomized(nn.BatchNorm2d(4))
        self.twice = _randomized(nn.BatchNorm2d(4))
        self.batch_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4, 4)
        self.after_3d = _randomized(nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.after_relu(torch.relu(self.conv(x)))
        y = self.shared_conv(x)
        x = self.after_shared(y) + y
        x = self.twice(self.twice(x))
        x = self.batch_stats(x)
        tokens = self.fc(x.flatten(2).transpose(1, 2))  # [N, L, C]: BN1d normalizes L here
        return self.after_3d(tokens)


def _fold(model: nn.Module, example: torch.Tensor):
    exported = torch.export.export(model, (example,), strict=False)
    return fold_batchnorms(model, exported)


def test_folding_is_exact_and_names_the_pairs():
    torch.manual_seed(0)
    model, x = Foldable().eval(), torch.randn(4, 3, 8, 8)
    original = copy.deepcopy(model)
    folded, unfolded = _fold(model, x)
    assert folded == [
        Folded("conv", "bn"),
        Folded("depthwise", "bn_dw"),
        Folded("conv1d", "bn1d"),
        Folded("fc", "bn_fc"),
    ]
    assert unfolded == []
    assert all(isinstance(model.get_submodule(f.norm), nn.Identity) for f in folded)
    with torch.no_grad():
        expected, got = original(x), model(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_unfoldable_batchnorms_stay_float_with_a_reason():
    torch.manual_seed(0)
    model, x = Unfoldable().eval(), torch.randn(2, 3, 2, 2)  # L = 4 = channels
    original = copy.deepcopy(model)
    folded, unfolded = _fold(model, x)
    assert folded == []
    reasons = {u.norm: u.reason for u in unfolded}
    assert "no Conv or Linear layer right before it" in reasons["after_relu"]
    assert "used elsewhere" in reasons["after_shared"]
    assert "called more than once" in reasons["twice"]
    assert "batch statistics" in reasons["batch_stats"]
    assert "[batch, features]" in reasons["after_3d"]
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def load():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # statistics a trained network could have: channels scaled 0.1x-30x
        net.bn.running_var.copy_(torch.logspace(-2, 3, 16))
        net.bn.running_mean.uniform_(-1, 1)
    return net.eval(), (torch.randn(2, 3, 8, 8),)


def batches():
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        yield {"x": torch.randn(8, 3, 8, 8, generator=generator)}
"""


@pytest.mark.parametrize("body", ['layer "conv" {\n  weight int8 channel\n}\n'])
def test_a_compiled_cnn_has_its_batchnorm_folded(tmp_path: Path, body: str):
    spec = write_project(tmp_path / "project", MODEL, body)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["folded"] == [{"layer": "conv", "batchnorm": "bn"}]
    model = onnx.load(str(out / "model.onnx"))
    assert not [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["cosine_min"] > 0.999  # per-channel int8 of the folded weight
    assert "BatchNorm folded: bn into conv." in (out / "report.md").read_text()


FIXED_SIZE = """
import math
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    \"\"\"TF "same" padding computed for 32x32 inputs at construction, then a Linear.\"\"\"

    def __init__(self, size=32):
        super().__init__()
        total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
        self.pad = (total // 2, total - total // 2, total // 2, total - total // 2)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * (size // 2) ** 2, 10)

    def forward(self, x):
        return self.fc(F.relu6(self.bn(self.conv(F.pad(x, self.pad)))).flatten(1))


def load():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 3, 32, 32),)


def batches():
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        yield {"x": torch.randn(8, 3, 32, 32, generator=generator)}
"""


def test_a_network_built_for_one_size_exports_that_size(tmp_path: Path):
    """33x33 runs (the stride rounds it away) but 64x64 does not: the spatial axes stay fixed
    and the batch axis is free in the ONNX file."""
    body = "defaults {\n  weight int8 channel\n}\n"
    spec = write_project(tmp_path / "project", FIXED_SIZE, body)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["inputs"]["x"]["shape"] == [None, 3, 32, 32]
    model = onnx.load(str(out / "model.onnx"))
    dims = [d.dim_value or None for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [None, 3, 32, 32]
    assert "Inputs: x [any, 3, 32, 32]" in (out / "report.md").read_text()


def test_token_sequences_stay_free():
    from projects import TINY_MODEL

    namespace: dict = {}
    exec(TINY_MODEL, namespace)
    module, (ids,) = namespace["load"]()
    assert free_axes(module, {"ids": ids}) == {"ids": (0, 1)}
