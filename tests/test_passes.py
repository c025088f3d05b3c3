"""The passes against closed-form or brute-force references on small layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import qspec
from qspec.compiler.capture import Layer, matrix
from qspec.compiler.numerics import QuantSpec, quantize
from qspec.compiler.resolve import SparsityPlan
from qspec.dsl.formats import WEIGHT_FORMATS
from qspec.passes.calibrate import input_rows
from qspec.passes.methods import keep_mask
from qspec.passes.obs import output_error
from qspec.passes.search import search_clip

RNG = np.random.default_rng(0)


def correlated(n: int, cols: int) -> np.ndarray:
    mixing = np.eye(cols) + RNG.normal(0, 0.3, (cols, cols))
    return (RNG.normal(size=(n, cols)) * RNG.lognormal(0, 1, cols)) @ mixing


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_every_n_of_m_group_is_valid(n: int, m: int):
    score = RNG.random((8, 32))
    keep = keep_mask(score, SparsityPlan(n, m, None, "magnitude"))
    assert (keep.reshape(8, -1, m).sum(-1) == n).all()
    # the kept ones are the largest of each group
    groups, kept = score.reshape(8, -1, m), keep.reshape(8, -1, m)
    assert (np.where(kept, groups, np.inf).min(-1) >= np.where(kept, -np.inf, groups).max(-1)).all()


def test_unstructured_ratio_per_row():
    keep = keep_mask(RNG.random((4, 100)), SparsityPlan(None, None, 0.3, "magnitude"))
    assert (keep.sum(1) == 70).all()


def test_conv_patches_follow_the_matrix_view():
    """input_rows(conv) @ matrix(weight).T must equal the convolution: the layout contract."""
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 3, 7, 7)
    layer = Layer("c", "conv2d", tuple(conv.weight.shape), conv.weight.numel(), 0)
    rows = input_rows(layer, conv, x)
    product = rows @ matrix(layer, conv.weight.detach()).T
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(product, expected.detach(), rtol=1e-5, atol=1e-5)


def test_clip_search_lowers_the_output_error():
    x = correlated(512, 64)
    hessian = x.T @ x / len(x)
    weight = RNG.standard_t(3, (32, 64)).astype(np.float32)  # heavy tails: clipping pays
    spec = QuantSpec(WEIGHT_FORMATS["int3"], "group", 32, symmetric=False)
    full = output_error(weight - quantize(weight, spec).dequantize(), hessian)
    clip = search_clip(weight, spec, hessian)
    searched = output_error(weight - quantize(weight, spec, clip).dequantize(), hessian)
    assert clip.shape == (32, 2) and (clip <= 1).all()
    assert searched < 0.95 * full


TINY = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x)) + x
        return x


def mixing():
    generator = torch.Generator().manual_seed(9)
    return torch.eye(64) + 0.5 * torch.randn(64, 64, generator=generator)


def load():
    torch.manual_seed(0)
    return Tiny(), (torch.randn(4, 64) @ mixing(),)


def batches():
    generator = torch.Generator().manual_seed(1)
    for _ in range(16):
        yield {"x": torch.randn(32, 64, generator=generator) @ mixing()}
"""


def compile_tiny(tmp_path: Path, body: str, name: str = "t", model: str = TINY):
    (tmp_path / "model.py").write_text(model)
    spec = tmp_path / f"{name}.qspec"
    spec.write_text(
        'qspec 1\nmodel "model.py:load"\ncalibration "model.py:batches" samples 384 holdout 128\n'
        + body
    )
    return qspec.compile(spec, tmp_path / name)


def test_gptq_beats_round_to_nearest_end_to_end(tmp_path: Path):
    rtn = compile_tiny(tmp_path, "defaults {\n  weight int3 group 32 asymmetric\n}\n", "rtn")
    gptq = compile_tiny(
        tmp_path, "defaults {\n  weight int3 group 32 asymmetric round gptq\n}\n", "gptq"
    )
    assert gptq.fidelity.snr_db > rtn.fidelity.snr_db + 1


def test_eora_beats_svd_beats_nothing(tmp_path: Path):
    base = "defaults {\n  weight int2 group 32 asymmetric\n"
    plain = compile_tiny(tmp_path, base + "}\n", "plain")
    eora = compile_tiny(tmp_path, base + "  compensate lora rank 8 by eora\n}\n", "eora")
    svd = compile_tiny(tmp_path, base + "  compensate lora rank 8 by svd\n}\n", "svd")
    assert eora.fidelity.snr_db > svd.fidelity.snr_db > plain.fidelity.snr_db
    assert {layer["rank"] for layer in eora.manifest["layers"]} == {8}
    assert all("low-rank r8 (fp16)" in layer["emitted"] for layer in eora.manifest["layers"])


def test_bias_correction_removes_the_mean_error(tmp_path: Path):
    """Inputs with a nonzero mean (as after a ReLU) make the rounding error biased."""
    offset = TINY.replace("@ mixing()", "@ mixing() + 2")
    base = "defaults {\n  weight int2 channel asymmetric\n"
    plain = compile_tiny(tmp_path, base + "}\n", "plain", offset)
    bias = compile_tiny(tmp_path, base + "  compensate bias\n}\n", "bias", offset)
    assert bias.fidelity.snr_db > plain.fidelity.snr_db


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_sparsity_density_is_measured(tmp_path: Path, method: str):
    build = compile_tiny(
        tmp_path, f"defaults {{\n  weight int8 channel\n  sparsity 2:4 by {method}\n}}\n", method
    )
    densities = {layer["density"] for layer in build.manifest["layers"]}
    assert densities == {0.5}


def test_sparsegpt_has_the_lowest_layer_errors(tmp_path: Path):
    """Per layer, on held-out inputs: the OBS update beats choosing a mask alone."""
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        body = f"defaults {{\n  sparsity 50% by {method}\n}}\n"
        build = compile_tiny(tmp_path, body, method)
        errors[method] = np.array([layer["relative_error"] for layer in build.report["layers"]])
    assert (errors["sparsegpt"] < errors["magnitude"]).all()
    assert (errors["sparsegpt"] < errors["wanda"]).all()


def test_search_format_records_the_choice(tmp_path: Path):
    build = compile_tiny(
        tmp_path, "defaults {\n  weight fp4_e2m1 group 32 search format clip\n}\n", "fp4"
    )
    notes = [note for layer in build.manifest["layers"] for note in layer.get("notes", [])]
    assert any(note.startswith("search format chose fp4_") for note in notes)


def test_passes_are_deterministic(tmp_path: Path):
    body = "defaults {\n  weight int4 group 32 asymmetric round gptq actorder\n}\n"
    first = compile_tiny(tmp_path, body, "a")
    second = compile_tiny(tmp_path, body, "b")
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (
        tmp_path / "b" / "model.onnx"
    ).read_bytes()
    assert first.fidelity == second.fidelity
