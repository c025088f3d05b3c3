"""torchvision's classifier families (random weights, BatchNorm statistics made non-trivial)
compile with W8A8 and with int4 weight-only specs, run in ONNX Runtime (and TVM where its
kernels cover the layers), and match their own float model.

Floors are the measured held-out cosine minus a margin (measured on 2026-12-01, 32x32 inputs,
16 held-out images). Every model must also shrink as its format says: a family whose weights
escape compression (nn.MultiheadAttention's packed projection did, in ViT) fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from projects import write_project

MODEL = """
import torch
from vision import torchvision_models

NAME, SIZE = {name!r}, {size}


def load():
    torch.manual_seed(0)
    options = {{"image_size": SIZE}} if NAME.startswith("vit") else {{}}
    net = getattr(torchvision_models(), NAME)(**options).eval()
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
        if isinstance(module, torch.nn.Linear) and not module.weight.any():  # zero-init heads
            torch.nn.init.normal_(module.weight, 0, 0.05, generator=generator)
    return net, {{"x": torch.randn(2, 3, SIZE, SIZE, generator=generator)}}


def batches():
    generator = torch.Generator().manual_seed(2)
    for _ in range(6):
        yield {{"x": torch.randn(8, 3, SIZE, SIZE, generator=generator)}}
"""

W8A8 = (
    "defaults {\n  weight int8 channel symmetric\n  activation int8 tensor static asymmetric\n}\n"
)
INT4 = "defaults {\n  weight int4 channel asymmetric\n}\n"
TVM = "target tvm { device llvm }\n"

# name -> (W8A8 cosine floor, int4 cosine floor, TVM runs its layers)
FAMILIES = {
    "resnet18": (0.997, 0.95, True),
    "mobilenet_v2": (0.999, 0.97, False),  # depthwise convs: the TVM backend packs groups=1 only
    "mobilenet_v3_small": (0.999, 0.96, False),
    "efficientnet_b0": (0.999, 0.98, False),
    "regnet_y_400mf": (0.999, 0.97, False),
    "squeezenet1_1": (0.997, 0.94, False),  # TVM 0.27 fails on ceil_mode pooling (if_then_else)
    "convnext_tiny": (0.998, 0.94, False),
    "vit_b_16": (0.998, 0.94, True),
}
SLOW = {"convnext_tiny", "vit_b_16"}  # 28M and 86M parameters: run, but last


def _build(folder: Path, name: str, body: str) -> dict:
    """Compile in a process of its own: torchvision loaded without its extension stays out of
    the test process (see vision.py)."""
    spec = write_project(folder, MODEL.format(name=name, size=32), body, name="spec.qspec")
    out = folder / "out"
    command = [sys.executable, "-m", "qspec", "compile", str(spec), "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([*command, "--progress=never"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES],
)
def test_a_torchvision_family_compiles_and_matches_its_float_model(tmp_path: Path, name: str):
    w8a8_floor, int4_floor, tvm = FAMILIES[name]
    w8a8 = _build(tmp_path / "w8a8", name, "target onnx { device cpu }\n" + W8A8)
    assert w8a8["fidelity"]["cosine_min"] >= w8a8_floor
    assert w8a8["totals"]["float_to_artifact"] > 3.4  # every conv and Linear stored in 8 bits
    int4 = _build(
        tmp_path / "int4", name, "target onnx { device cpu }\n" + (TVM if tvm else "") + INT4
    )
    assert int4["totals"]["float_to_artifact"] > 6.0
    for target in int4["targets"]:
        assert target["verified"], target
        assert target["fidelity"]["cosine_min"] >= int4_floor, target
    assert len(int4["targets"]) == (2 if tvm else 1)
