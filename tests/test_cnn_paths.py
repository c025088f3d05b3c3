"""Published-model shapes that capture must rewrite (layer subclasses with a forward of their
own, nn.MultiheadAttention) and the W8A8 integer path of a CNN: convolutions quantized after
the ReLU/ReLU6 that reads them, residual Adds in integer, nothing float in between."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from projects import write_project
from torch import nn
from torch.nn import functional as F

from qspec.cli import main
from qspec.compiler import host
from qspec.compiler.attention import SplitAttention, split_attention
from qspec.compiler.errors import UserError
from qspec.compiler.plain import plain_layers
from qspec.runtime import load


class SamePadConv(nn.Conv2d):
    """TensorFlow "same" padding computed at construction, as EfficientNet ports do."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, 1, self.groups)


class ScaledOutput(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_conv_subclass_that_pads_becomes_a_plain_conv_with_the_padding_as_pre_hook():
    torch.manual_seed(0)
    net = nn.Sequential(SamePadConv(3, 4, 3, stride=2), nn.ReLU(), SamePadConv(4, 4, 3, groups=4))
    reference, x = copy.deepcopy(net), torch.randn(2, 3, 9, 9)
    replaced, kept = plain_layers(net)
    assert replaced == ["0", "2"] and kept == []
    assert type(net[0]) is nn.Conv2d and net[2].groups == 4
    assert torch.equal(net(x), reference(x))


def test_a_subclass_that_changes_its_output_stays_as_it_is_and_is_reported():
    net = nn.Sequential(ScaledOutput(4, 4))
    replaced, kept = plain_layers(net)
    assert replaced == [] and type(net[0]) is ScaledOutput
    assert "computes its own forward" in kept[0].reason


@pytest.mark.parametrize("batch_first", [False, True])
def test_split_attention_computes_what_multihead_attention_computes(batch_first: bool):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    split = SplitAttention(mha).eval()
    q, k = torch.randn(3, 5, 16), torch.randn(3, 7, 16)  # [N, L, E], [N, S, E]
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    padding = torch.zeros(3, 7, dtype=torch.bool)  # [N, S]
    padding[:, -2:] = True
    mask = torch.randn(5, 7)  # [L, S]
    for options in ({}, {"need_weights": False}, {"key_padding_mask": padding, "attn_mask": mask}):
        out, weights = mha(q, k, k, **options)
        ours, our_weights = split(q, k, k, **options)
        assert torch.allclose(out, ours, atol=1e-6)
        assert (weights is None) == (our_weights is None)
        if weights is not None:
            assert torch.allclose(weights, our_weights, atol=1e-6)


def test_attention_with_extra_key_rows_is_left_packed_and_reported():
    net = nn.Sequential()
    net.add_module("plain", nn.MultiheadAttention(8, 2))
    net.add_module("biased", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    split, packed = split_attention(net)
    assert split == ["plain"] and isinstance(net.plain, SplitAttention)
    assert [p.module for p in packed] == ["biased"] and "add_bias_kv" in packed[0].reason


MOBILE = """
import torch
from torch import nn


class Block(nn.Module):
    \"\"\"Inverted residual: expand (ReLU6), depthwise (ReLU6), project, + input.\"\"\"

    def __init__(self, channels):
        super().__init__()
        self.expand = nn.Conv2d(channels, 4 * channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4 * channels)
        self.depthwise = nn.Conv2d(4 * channels, 4 * channels, 3, padding=1, groups=4 * channels)
        self.bn2 = nn.BatchNorm2d(4 * channels)
        self.project = nn.Conv2d(4 * channels, channels, 1)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        y = self.act(self.bn1(self.expand(x)))
        y = self.act(self.bn2(self.depthwise(y)))
        return x + self.project(y)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(self.blocks(x)).mean((2, 3))


def load():
    torch.manual_seed(0)
    net = Net().eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2)
            module.running_mean.normal_(0, 0.2)
    return net, (torch.randn(2, 3, 12, 12),)


def batches():
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        yield {"x": torch.randn(8, 3, 12, 12, generator=generator)}
"""

W8A8 = """target onnx { device cpu }
defaults {
  weight int8 channel symmetric
  activation int8 tensor asymmetric static
}
"""


def test_w8a8_keeps_the_graph_integer_from_convolution_to_convolution(tmp_path: Path):
    """Every ReLU/ReLU6 is absorbed by the grid of the convolution before it, and the residual
    Adds read dequantized tensors: ONNX Runtime runs QLinearConv and QLinearAdd only."""
    spec = write_project(tmp_path / "project", MOBILE, W8A8)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out), "--progress=never"]) == 0
    model = onnx.load(str(out / "model.onnx"))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Clip"] == ops["Relu"] == 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert optimized["QLinearConv"] == 8 and optimized["QLinearAdd"] == 2, optimized
    assert not {"Conv", "FusedConv", "Add", "Clip", "Relu"} & set(optimized), optimized
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["cosine_min"] > 0.999
    # signed weights (the fast u8 x s8 kernels) only from a build machine with VNNI, and an
    # artifact that has them refuses to load on a CPU without
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"][0]["needs_vnni"] == host.has_vnni()
    if manifest["targets"][0]["needs_vnni"]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(host, "has_vnni", lambda: False)
            with pytest.raises(UserError, match="VNNI"):
                load(out)


@pytest.mark.parametrize("method", ["percentile 99.9", "mse", "entropy"])
def test_each_calibration_method_builds_and_names_itself(tmp_path: Path, method: str):
    body = W8A8.replace("static\n", f"static calibrate {method}\n")
    spec = write_project(tmp_path / "project", MOBILE, body)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out), "--progress=never"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["cosine_min"] > 0.99
    assert f"calibrate {method}" in (out / "report.md").read_text()
