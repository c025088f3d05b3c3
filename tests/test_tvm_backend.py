"""The TVM backend: every stored weight format through a compiled kernel against the numpy
reference, the shared decode against numpy on random bitstreams, and whole builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import unpack
from projects import TINY_MODEL as TINY
from projects import write_project
from torch import nn
from tvm import relax

import qspec
from qspec.backends.tvm import tune
from qspec.backends.tvm.decode import code_at
from qspec.backends.tvm.export import LIBRARY, PARAMS, compile_program, export_program
from qspec.backends.tvm.layout import Packed, pack_quantized, words
from qspec.backends.tvm.modules import PackedConv, PackedEmbedding, PackedLinear, conv_options
from qspec.backends.tvm.ops import TorchOps, decoded
from qspec.compiler.errors import UserError
from qspec.compiler.numerics import QuantSpec, quantize
from qspec.dsl.diagnostics import SpecError
from qspec.dsl.formats import WEIGHT_FORMATS

CPU = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
RNG = np.random.default_rng(0)


def run_tvm(module: nn.Module, inputs: dict[str, torch.Tensor], tmp_path: Path) -> np.ndarray:
    compiled = compile_program(export_program(module.eval(), inputs), CPU, tmp_path)
    assert compiled.kernels
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / LIBRARY)), tvm.cpu())
    stored = tvm.runtime.load_param_dict_from_file(str(tmp_path / PARAMS))
    feed = [tvm.runtime.tensor(t.numpy()) for t in inputs.values()]
    return vm["main"](*feed, *(stored[name] for name in compiled.params)).numpy()


def spec_of(name: str, granularity: str = "group", group: int | None = 32, **kw) -> QuantSpec:
    fmt = WEIGHT_FORMATS[name]
    symmetric = kw.pop("symmetric", fmt.family != "uint")
    group = group if granularity == "group" else None
    return QuantSpec(fmt, granularity, group, symmetric, **kw)  # type: ignore[arg-type]


FORMAT_CASES = [
    *(spec_of(name) for name in WEIGHT_FORMATS),
    spec_of("int4", symmetric=False),
    spec_of("int3", group=48),  # the last block of 80 columns is partial
    spec_of("int8", "channel"),
    spec_of("uint8", "tensor"),
    spec_of("fp8_e4m3", "channel"),
    spec_of("nf4", group=64, scale_format="fp16"),
    spec_of("fp4_e2m1", scale_format="e8m0"),
    spec_of("int4", group=16, scale_format="fp8"),
]


def nm_mask(weight: np.ndarray, n: int, m: int) -> np.ndarray:
    groups = np.abs(weight).reshape(weight.shape[0], -1, m)
    keep = np.argsort(-groups, axis=-1)[..., :n]
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    return mask.reshape(weight.shape)


@pytest.mark.parametrize(
    "spec",
    FORMAT_CASES,
    ids=lambda s: (
        f"{s.format.name}-{s.granularity}-"
        f"{s.group_size}-{'sym' if s.symmetric else 'asym'}-{s.scale_format}"
    ),
)
def test_every_format_through_a_tvm_linear(spec: QuantSpec, tmp_path: Path):
    weight = RNG.standard_normal((24, 80)).astype(np.float32)
    bias = RNG.standard_normal(24).astype(np.float32)
    quantized = quantize(weight, spec)
    x = torch.randn(3, 5, 80)
    got = run_tvm(PackedLinear(pack_quantized(quantized), bias), {"x": x}, tmp_path)
    want = x.numpy() @ quantized.dequantize().T + bias
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("fmt", "n", "m"), [("int4", 2, 4), ("int8", 4, 8), ("nf4", 1, 4)])
def test_nm_sparse_weights_are_stored_compressed(fmt: str, n: int, m: int, tmp_path: Path):
    weight = RNG.standard_normal((16, 64)).astype(np.float32)
    mask = nm_mask(weight, n, m)
    quantized = quantize(weight * mask, spec_of(fmt))
    packed = pack_quantized(quantized, mask, (n, m))
    dense = pack_quantized(quantized)
    assert packed.codes.nbytes < dense.codes.nbytes * n / m + 16
    x = torch.randn(7, 64)
    got = run_tvm(PackedLinear(packed, None), {"x": x}, tmp_path)
    want = x.numpy() @ (quantized.dequantize() * mask).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_packed_embedding_decodes_only_the_rows_looked_up(tmp_path: Path):
    table = RNG.standard_normal((50, 32)).astype(np.float32)
    quantized = quantize(table, spec_of("uint4", symmetric=False))
    ids = torch.randint(0, 50, (2, 9))
    got = run_tvm(PackedEmbedding(pack_quantized(quantized)), {"ids": ids}, tmp_path)
    np.testing.assert_allclose(got, quantized.dequantize()[ids.numpy()], rtol=1e-6)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.Conv2d(4, 6, (1, 3), dilation=2),
        nn.Conv1d(5, 7, 3, padding=2),
    ],
    ids=["conv2d-stride-pad", "conv2d-dilation", "conv1d"],
)
def test_packed_convolution(conv: nn.Module, tmp_path: Path):
    out, inp, *kernel = conv.weight.shape
    matrix = conv.weight.detach().movedim(1, -1).reshape(out, -1).numpy()  # (kernel, in) columns
    quantized = quantize(matrix, spec_of("int4", group=8))
    bias = conv.bias.detach().numpy()
    module = PackedConv(pack_quantized(quantized), bias, conv_options(conv))
    x = torch.randn(2, inp, *([9] * len(kernel)))
    got = run_tvm(module, {"x": x}, tmp_path)
    weight = torch.from_numpy(quantized.dequantize()).reshape(out, *kernel, inp).movedim(-1, 1)
    with torch.no_grad():
        conv.weight.copy_(weight)
        want = conv(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 64)], ids=["rows", "batch-rows"])
def test_float_layers_compile(shape: tuple[int, ...], tmp_path: Path):
    """Layers a spec leaves in float (and fp16 low-rank branches) are plain matmuls whose
    epilogue the matmul rule cannot always fold: their store must still find its loop."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    x = torch.randn(*shape)
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(run_tvm(module, {"input": x}, tmp_path), want, rtol=1e-4, atol=1e-5)


# --- the shared decode against numpy ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_bitstream_decode_inverts_packing(bits: int, count: int, seed: int):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, count).astype(np.uint8)
    stream = torch.from_numpy(words(codes, bits))
    got = code_at(TorchOps(), stream, bits, torch.arange(count))
    np.testing.assert_array_equal(got.numpy(), codes)
    assert stream.numel() * 4 <= -(-count * bits // 8) + 7  # the minimum, whole words, a spare


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(WEIGHT_FORMATS)),
    rows=st.integers(1, 6),
    cols=st.integers(1, 70),
    group=st.sampled_from([None, 8, 32]),
    scale_format=st.sampled_from(["fp32", "fp16", "fp8", "e8m0"]),
    seed=st.integers(0, 2**16),
)
def test_torch_reference_decode_matches_dequantize(name, rows, cols, group, scale_format, seed):
    spec = spec_of(name, "group" if group else "channel", group, scale_format=scale_format)
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    quantized = quantize(weight, spec)
    packed = pack_quantized(quantized)
    got = decoded(_torch(packed), packed.meta)
    np.testing.assert_array_equal(got.numpy(), quantized.dequantize())
    if spec.format.bits in (2, 4, 8):  # the same codes as the ONNX packing
        unpacked = unpack(packed.codes.view(np.uint8).reshape(1, -1), spec.format.bits, rows * cols)
        np.testing.assert_array_equal(unpacked.reshape(rows, cols), quantized.codes)


def _torch(packed: Packed) -> dict[str, torch.Tensor | None]:
    return {k: None if v is None else torch.from_numpy(v) for k, v in packed.tensors().items()}


# --- builds ----------------------------------------------------------------------------------


BOTH = """
target onnx
target tvm { device llvm }
layer "embed" { weight nf4 group 32 }
layer "fc1" { weight int3 group 16 asymmetric
  sparsity 2:4 }
layer "fc2" { weight int4 group 32
  compensate lora rank 4 }
"""


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tvm")
    spec = write_project(folder, TINY, BOTH)
    qspec.compile(spec, folder / "build")
    return folder / "build"


def test_one_compile_emits_both_targets(tiny_build: Path):
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    onnx_entry, tvm_entry = manifest["targets"]
    assert (onnx_entry["backend"], tvm_entry["backend"]) == ("onnx", "tvm")
    assert tvm_entry["file"] == "tvm/model.so" and tvm_entry["params"] == "tvm/params.bin"
    assert tvm_entry["target"]["kind"] == "llvm" and tvm_entry["target"]["mcpu"]
    assert tvm_entry["bytes"] == sum((tiny_build / f).stat().st_size for f in tvm_entry["sha256"])
    assert tvm_entry["verified"] and onnx_entry["verified"]
    assert abs(tvm_entry["fidelity"]["cosine_mean"] - onnx_entry["fidelity"]["cosine_mean"]) < 1e-4
    layers = tvm_entry["layers"]
    assert layers["fc1"]["emitted"] == "decode in matmul (3-bit codes 2:4 compressed)"
    assert layers["fc2"]["emitted"].endswith("+ low-rank r4 (fp16)")
    assert layers["embed"]["emitted"] == "decode in gather (4-bit codes)"


def test_packed_parameters_stay_packed(tiny_build: Path):
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    tvm_entry = manifest["targets"][1]
    stored = tvm.runtime.load_param_dict_from_file(str(tiny_build / tvm_entry["params"]))
    dtypes = {name: str(stored[name].dtype) for name in tvm_entry["param_names"]}
    assert dtypes["p_fc1_codes"] == "int32" and dtypes["p_embed_table"] == "float32"
    assert not any(name.endswith("_weight") and "fc" in name for name in dtypes)
    entries = {entry["name"]: entry for entry in manifest["layers"]}
    fc1 = entries["fc1"]
    assert tvm_entry["layers"]["fc1"]["bytes"] < fc1["min_bytes"]  # 2:4: half the codes


def test_run_and_load_tvm_in_a_fresh_process(tiny_build: Path, tmp_path: Path):
    ids = np.random.default_rng(3).integers(0, 50, (5, 11))
    np.savez(tmp_path / "in.npz", ids=ids)
    outputs = {}
    for backend in ("onnx", "tvm"):
        out = tmp_path / f"{backend}.npz"
        command = [sys.executable, "-m", "qspec", "run", str(tiny_build), "--backend", backend]
        command += ["--input", str(tmp_path / "in.npz"), "--output", str(out)]
        subprocess.run(command, check=True, capture_output=True)
        outputs[backend] = np.load(out)["output"]
    np.testing.assert_allclose(outputs["tvm"], outputs["onnx"], rtol=1e-4, atol=1e-5)
    loaded = qspec.load(tiny_build, backend="tvm")({"ids": ids})["output"]
    np.testing.assert_allclose(loaded, outputs["tvm"], rtol=1e-6)
    command = [sys.executable, "-m", "qspec", "run", str(tiny_build), "--backend", "gpu"]
    command += ["--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "gpu.npz")]
    missing = subprocess.run(command, capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "the build has no gpu artifact (it has: onnx, tvm)" in missing.stderr


def test_activation_quantization_on_tvm_points_at_the_rule(tmp_path: Path):
    body = 'target tvm\nlayer "fc1" { weight int8 channel\n activation int8 token dynamic }\n'
    spec = write_project(tmp_path, TINY, body)
    with pytest.raises(SpecError) as caught:
        qspec.compile(spec, tmp_path / "out")
    text = caught.value.render()
    assert "target tvm cannot run quantized activations on fc1" in text
    assert "tiny.qspec:6:" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_compiles(tmp_path: Path, arch: str):
    body = f'target tvm {{ device cuda arch {arch} }}\nlayer "fc*" {{ weight int4 group 32 }}\n'
    spec = write_project(tmp_path, TINY, body)
    build = qspec.compile(spec, tmp_path / "out")
    entry = build.manifest["targets"][0]
    assert entry["target"] == {**entry["target"], "kind": "cuda", "arch": arch}
    assert entry["kernels"] > 0 and not entry["verified"]
    assert entry["device_code"] == "fatbin (nvcc)"
    assert (tmp_path / "out" / "tvm" / "model.so").stat().st_size > 0
    if not tvm.cuda().exist:
        with pytest.raises(UserError, match=f"tvm in .* is compiled for CUDA {arch} and this"):
            qspec.load(tmp_path / "out", backend="tvm")


def test_tune_trials_measure_once_then_reuse(tmp_path: Path, monkeypatch):
    body = 'target tvm { device llvm tune trials 8 }\nlayer "fc*" { weight int4 group 32 }\n'
    spec = write_project(tmp_path, TINY, body)
    qspec.compile(spec, tmp_path / "first")
    cache = json.loads((Path(os.environ["QSPEC_CACHE_DIR"]) / "tvm-tuning.json").read_text())
    assert cache and set(cache.values()) <= {tune.COLUMN_TILE, *tune.CANDIDATES}

    def measure(*_):
        raise AssertionError("a cached kernel was measured again")

    monkeypatch.setattr(tune, "_seconds", measure)
    again = qspec.compile(spec, tmp_path / "again")
    assert again.manifest["targets"][0]["verified"]


@pytest.mark.parametrize("bad", [7, 0, "32", None, 3.5])
def test_hostile_tuning_entries_are_measured_again(tmp_path: Path, bad):
    body = 'target tvm { device llvm tune trials 8 }\nlayer "fc*" { weight int4 group 32 }\n'
    spec = write_project(tmp_path, TINY, body)
    qspec.compile(spec, tmp_path / "first")
    path = Path(os.environ["QSPEC_CACHE_DIR"]) / "tvm-tuning.json"
    path.write_text(json.dumps({key: bad for key in json.loads(path.read_text())}))
    again = qspec.compile(spec, tmp_path / "again")
    assert again.manifest["targets"][0]["verified"]
    assert set(json.loads(path.read_text()).values()) <= {tune.COLUMN_TILE, *tune.CANDIDATES}
