"""The ONNX backend: every emission path exported, run in ONNX Runtime and compared with numpy.

Tiny random layers become CompressedLayers directly (numerics.quantize, plus calibrated scales
for static activations). Each test puts many layers side by side in one module, exports it once
and runs it once: one export per path family keeps the file fast. Three things are checked per
layer: ONNX Runtime's output against an independent numpy reference, the lowered torch module
(the custom operators' reference implementations) against the same reference, and what the file
and ONNX Runtime's optimized graph contain.

Tolerances: float-compute paths agree to 1e-4 of the output's range (measured: below 1e-6).
Paths with quantized activations are compared with a reference that quantizes them as the
kernel does (per tensor with the calibrated scale; uint8 per tensor for DynamicQuantizeMatMul;
int8 per row and block for MatMulNBits level 4). An activation on a rounding tie may still round
the other way (float32 there, float64 here), which moves an output by far less than the 1e-3 of
the range these paths get (measured: below 2e-7). QLinearConv outputs are quantized themselves:
at most one output step apart, on the few values that sit on a tie.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qspec
from qspec.backends.lowering import lowered_module
from qspec.backends.onnx.export import OnnxArtifact, emit
from qspec.backends.onnx.modules import lower
from qspec.compiler.capture import Graph, Layer, matrix, unmatrix
from qspec.compiler.errors import UserError
from qspec.compiler.numerics import Quantized, QuantSpec, nbytes, quantize
from qspec.compiler.qmodel import CompressedLayer, QModel
from qspec.compiler.resolve import ActivationPlan, LayerPlan, LowRankPlan
from qspec.dsl import ir
from qspec.dsl.formats import WEIGHT_FORMATS
from qspec.passes.quantize import static_scale

EXAMPLES = Path(__file__).parents[1] / "examples"
WEIGHT_SPAN = ir.Span("test.qspec", 4, 3, 4, 30)
ACTIVATION_SPAN = ir.Span("test.qspec", 5, 3, 5, 33)
FLOAT_TOLERANCE = 1e-4
QUANTIZED_TOLERANCE = 1e-3
INT8_DYNAMIC = ActivationPlan("int8", "tensor", dynamic=True, symmetric=True)
INT8_TOKEN = ActivationPlan("int8", "token", dynamic=True, symmetric=True)
INT8_STATIC = ActivationPlan("int8", "tensor", dynamic=False, symmetric=True)
UINT8_STATIC = ActivationPlan("uint8", "tensor", dynamic=False, symmetric=False)
NBITS_BLOCKS = (256, 128, 64, 32, 16)


@dataclass(frozen=True)
class Case:
    format: str
    granularity: str = "channel"
    group: int | None = None
    symmetric: bool = True
    scale_format: str = "fp32"
    activation: ActivationPlan | None = None

    def spec(self) -> QuantSpec:
        return QuantSpec(
            WEIGHT_FORMATS[self.format],
            self.granularity,  # type: ignore[arg-type]
            self.group,
            self.symmetric,
            self.scale_format,  # type: ignore[arg-type]
        )

    def __str__(self) -> str:
        grain = f"g{self.group}" if self.group else self.granularity
        act = f" act {self.activation.describe()}" if self.activation else ""
        sym = "sym" if self.symmetric else "asym"
        return f"{self.format} {grain} {sym} {self.scale_format}{act}"


def every_linear_case() -> list[Case]:
    """Every weight format x tensor/channel/group 32/group 16 x the symmetries it allows."""
    cases = []
    for fmt in WEIGHT_FORMATS.values():
        symmetries = {"int": [True, False], "uint": [False]}.get(fmt.family, [True])
        for granularity, group in (
            ("tensor", None),
            ("channel", None),
            ("group", 32),
            ("group", 16),
        ):
            cases += [Case(fmt.name, granularity, group, symmetric) for symmetric in symmetries]
    return cases


# ---- building, exporting, running ---------------------------------------------------------------


class SideBySide(nn.Module):
    """Layers side by side, each reading input x, y, z or x0 (the first row of x: 2-D)."""

    def __init__(self, layers: list[nn.Module], routes: list[str]):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(f"l{i}", layer)
        self.routes = routes

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        inputs = {"x": x, "y": y, "z": z, "x0": x[0]}
        return tuple(getattr(self, f"l{i}")(inputs[r]) for i, r in enumerate(self.routes))


def route_input(inputs: dict[str, torch.Tensor], route: str) -> torch.Tensor:
    return inputs["x"][0] if route == "x0" else inputs[route]


def layer_of(name: str, module: nn.Module) -> Layer:
    kind = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}.get(
        type(module), "embedding"
    )
    return Layer(
        name,
        kind,  # type: ignore[arg-type]
        tuple(module.weight.shape),
        sum(p.numel() for p in module.parameters()),
        0,
        getattr(module, "groups", 1),
    )


def compress(name: str, module: nn.Module, case: Case, x: torch.Tensor) -> CompressedLayer:
    """What passes.quantize makes of `module`, its static scales calibrated on x."""
    layer = layer_of(name, module)
    weight = matrix(layer, module.weight.detach()).numpy()
    bias = getattr(module, "bias", None)
    sources = {"weight": WEIGHT_SPAN, "activation": ACTIVATION_SPAN}
    plan = LayerPlan(layer, None, case.activation, None, None, False, sources=sources)
    compressed = CompressedLayer(
        layer=layer,
        plan=plan,
        weight=quantize(weight, case.spec()),
        float_weight=weight,
        bias=None if bias is None else bias.detach().numpy(),
        activation=case.activation,
    )
    if case.activation is not None and not case.activation.dynamic:
        with torch.no_grad():
            y = module(x)
        compressed.activation_scale, compressed.activation_zero_point = static_scale(
            case.activation, float(x.min()), float(x.max())
        )
        compressed.output_scale, compressed.output_zero_point = static_scale(
            case.activation, float(y.min()), float(y.max())
        )
    return compressed


@dataclass
class Run:
    modules: list[nn.Module]
    inputs: list[torch.Tensor]  # what each layer read
    qmodel: QModel
    artifact: OnnxArtifact
    model: onnx.ModelProto
    outputs: list[np.ndarray]
    torch_outputs: list[np.ndarray]
    optimized: Counter  # op types in ONNX Runtime's optimized graph

    def initializer(self, name: str) -> onnx.TensorProto:
        return next(t for t in self.model.graph.initializer if t.name == name)

    def emitted(self) -> list[str]:
        return [self.artifact.emitted[f"l{i}"] for i in range(len(self.modules))]


def export_and_run(
    tmp_path: Path,
    layers: list[tuple[nn.Module, Case, str]],
    inputs: dict[str, torch.Tensor],
) -> Run:
    """Export the layers side by side, run the file in ONNX Runtime and the lowered module."""
    modules = [m.eval() for m, _, _ in layers]
    routes = [r for _, _, r in layers]
    layer_inputs = [route_input(inputs, r) for r in routes]
    qmodel = {
        f"l{i}": compress(f"l{i}", m, c, layer_inputs[i]) for i, (m, c, _) in enumerate(layers)
    }
    side = SideBySide(modules, routes).eval()
    graph = Graph(side, inputs, tuple(inputs), {n: c.layer for n, c in qmodel.items()}, "export")
    path = tmp_path / "model.onnx"
    artifact = emit(graph, qmodel, None, path)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    outputs = session.run(None, feed)
    optimized = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    lowered_net, _ = lowered_module(graph.module, qmodel, lower)
    with torch.no_grad():
        torch_outputs = [t.numpy() for t in lowered_net(**inputs)]
    return Run(modules, layer_inputs, qmodel, artifact, model, outputs, torch_outputs, optimized)


# ---- numpy references ---------------------------------------------------------------------------


def fake_quantize(x: np.ndarray, scale: float, zero: int, fmt: str) -> np.ndarray:
    low, high = (-128, 127) if fmt == "int8" else (0, 255)
    scale = np.float32(scale)
    return (np.clip(np.rint(x / scale) + zero, low, high) - zero) * scale


def dynamic_uint8(x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's DynamicQuantizeLinear: uint8, range [min(x, 0), max(x, 0)] per tensor."""
    low, high = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    scale = (high - low) / np.float32(255)
    zero = np.clip(np.rint(-low / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def int8_rows(x: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits accuracy level 4: symmetric int8 per row and block of the reduction axis."""
    blocks = x.reshape(*x.shape[:-1], -1, block)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    scale = np.where(scale == 0, 1, scale)
    return (np.clip(np.rint(blocks / scale), -127, 127) * scale).reshape(x.shape)


def weight_scale(quantized: Quantized) -> np.ndarray:
    scales = quantized.scales
    return scales[0, 0] if quantized.spec.granularity == "tensor" else scales[:, 0]


def reference(compressed: CompressedLayer, module: nn.Module, x: np.ndarray) -> np.ndarray:
    """What the layer must compute, from the CompressedLayer alone, in float64."""
    quantized = compressed.weight
    assert quantized is not None
    weight = quantized.dequantize().astype(np.float64)
    bias = compressed.bias
    activation = compressed.activation
    kind = compressed.layer.kind
    if kind == "embedding":
        return weight[x]
    x = x.astype(np.float64)
    if activation is not None and activation.granularity == "token":
        spec = quantized.spec
        per_row = spec.format.bits == 8  # MatMulInteger; else MatMulNBits level 4, per block
        block = (
            x.shape[-1] if per_row else nbits_block(spec.granularity, spec.group_size, x.shape[-1])
        )
        x = int8_rows(x, block)
    elif activation is not None and activation.dynamic:
        x = dynamic_uint8(x.astype(np.float32)).astype(np.float64)
    elif activation is not None:
        scale, zero = compressed.activation_scale, compressed.activation_zero_point
        x = fake_quantize(x, scale, zero, activation.format)
        if bias is not None:  # int32 at scale input x weight
            bias_scale = np.float32(scale) * weight_scale(quantized)
            bias = np.rint(bias / bias_scale) * bias_scale.astype(np.float64)
    if kind == "linear":
        y = x @ weight.T
        return y if bias is None else y + bias
    convolve = F.conv1d if kind == "conv1d" else F.conv2d
    options = {k: getattr(module, k) for k in ("stride", "padding", "dilation", "groups")}
    y = convolve(
        torch.from_numpy(x),
        unmatrix(compressed.layer, torch.from_numpy(weight)),
        None if bias is None else torch.from_numpy(np.asarray(bias, np.float64)),
        **options,
    ).numpy()
    if activation is not None:
        scale, zero = compressed.output_scale, compressed.output_zero_point
        y = fake_quantize(y, scale, zero, activation.format)
    return y


def check_outputs(run: Run) -> None:
    """ONNX Runtime and the torch reference ops against numpy."""
    for i, module in enumerate(run.modules):
        compressed = run.qmodel[f"l{i}"]
        expected = reference(compressed, module, run.inputs[i].numpy())
        span = float(np.abs(expected).max()) or 1.0
        activation = compressed.activation
        tolerance = FLOAT_TOLERANCE if activation is None else QUANTIZED_TOLERANCE
        if activation and not activation.dynamic and compressed.layer.kind.startswith("conv"):
            tolerance = 1.001 * compressed.output_scale / span  # one output step
        label = f"{compressed.layer.kind} {describe(compressed)} ({run.emitted()[i]})"
        for source, got in (("onnxruntime", run.outputs[i]), ("torch", run.torch_outputs[i])):
            assert got.shape == expected.shape, label
            error = float(np.abs(got - expected).max())
            assert error <= tolerance * span, f"{source} {label}: {error} > {tolerance * span}"


def describe(compressed: CompressedLayer) -> str:
    assert compressed.weight is not None
    spec = compressed.weight.spec
    grain = f"g{spec.group_size}" if spec.group_size else spec.granularity
    act = f" act {compressed.activation.describe()}" if compressed.activation else ""
    sym = "sym" if spec.symmetric else "asym"
    return f"{spec.format.name} {grain} {sym} {spec.scale_format}{act}"


def nbits_block(granularity: str, group: int | None, cols: int) -> int | None:
    """The MatMulNBits / GatherBlockQuantized block: the group, else the largest that divides."""
    if granularity == "group":
        return group
    return next((b for b in NBITS_BLOCKS if cols % b == 0), None)


def expected_emission(case: Case, kind: str, cols: int) -> str:
    """The lowering table of modules.py, restated for weight-only layers."""
    fmt = WEIGHT_FORMATS[case.format]
    nbits = nbits_block(case.granularity, case.group, cols) in NBITS_BLOCKS
    op = {"linear": "MatMul", "embedding": "Gather"}.get(kind, "Conv")
    if kind == "embedding":
        gather = fmt.is_integer and fmt.bits == 4 and nbits
        return "GatherBlockQuantized" if gather else "decode+Gather"
    if kind == "linear" and fmt.is_integer and fmt.bits in (2, 4, 8) and nbits:
        return "MatMulNBits"
    if fmt.is_float and fmt.bits == 8:
        element = {"fp8_e4m3": "FLOAT8E4M3FN", "fp8_e5m2": "FLOAT8E5M2"}[case.format]
        return f"DequantizeLinear {element}+{op}"
    if kind != "linear" and fmt.is_integer and fmt.bits in (4, 8):
        return f"DequantizeLinear {'' if case.symmetric else 'U'}INT{fmt.bits}+{op}"
    return f"decode+{op}"


def seeded(factory, count: int, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [factory() for _ in range(count)]


def check_file_storage(run: Run) -> None:
    """Low-bit data stays low-bit in the file: the element type of every code initializer."""
    for i, what in enumerate(run.emitted()):
        if what.startswith("DequantizeLinear "):
            element = what.split()[1].split("+")[0]
            codes = run.initializer(f"l{i}.codes")
            assert onnx.TensorProto.DataType.Name(codes.data_type) == element, what
        elif what.startswith(("decode", "MatMulNBits", "GatherBlockQuantized")):
            packed = run.initializer(f"l{i}.packed")
            assert packed.data_type == onnx.TensorProto.UINT8, what


# ---- weight-only paths ------------------------------------------------------------------------


def test_every_weight_format_through_linear(tmp_path: Path):
    cases = every_linear_case()
    # 40 columns: no MatMulNBits block fits channel scales, and groups may be odd or partial
    odd = [
        Case("int4", "channel"),
        Case("uint4", "group", 24, False),
        Case("int8", "group", 20),
        Case("uint8", "tensor", None, False),
        Case("uint8", "group", 16, False),
        Case("int2", "channel"),
        Case("int4", "group", 32, scale_format="e8m0"),
        Case("fp8_e4m3", "group", 16, scale_format="fp16"),
    ]
    wide = seeded(lambda: nn.Linear(64, 24), len(cases), seed=0)
    narrow = seeded(lambda: nn.Linear(40, 8), len(odd), seed=1)
    layers = [(m, c, "x") for m, c in zip(wide, cases, strict=True)]
    layers += [(m, c, "y") for m, c in zip(narrow, odd, strict=True)]
    torch.manual_seed(2)
    run = export_and_run(tmp_path, layers, {"x": torch.randn(2, 5, 64), "y": torch.randn(3, 40)})
    expected = [expected_emission(c, "linear", 64) for c in cases]
    expected += [expected_emission(c, "linear", 40) for c in odd]
    assert run.emitted() == expected
    check_file_storage(run)
    assert run.optimized["MatMulNBits"] >= expected.count("MatMulNBits")
    fp8 = sum("FLOAT8" in e for e in expected)
    assert run.optimized["DequantizeLinear"] >= fp8  # not fused: dequantized every call
    check_outputs(run)


def test_conv_weights(tmp_path: Path):
    conv = [
        Case("int4", "group", 16),
        Case("uint4", "channel", None, False),
        Case("int8", "channel"),
        Case("uint8", "group", 8, False),
        Case("int4", "tensor"),
        Case("int8", "tensor", None, False),
        Case("fp8_e4m3", "channel"),
        Case("fp8_e5m2", "group", 16),
        Case("nf4", "group", 16),
        Case("fp4_e2m1", "channel"),
        Case("int3", "channel"),
        Case("uint2", "group", 16, False),
    ]
    depthwise = [
        Case("int4", "channel"),
        Case("uint8", "channel", None, False),
        Case("int8", "tensor"),
        Case("fp8_e4m3", "channel"),
        Case("nf4", "channel"),
    ]
    conv1d = [Case("int4", "group", 16), Case("uint8", "channel", None, False), Case("fp8_e5m2")]
    torch.manual_seed(3)
    layers = [
        (nn.Conv2d(16, 8, 3, padding=1, stride=(i % 2) + 1), c, "x") for i, c in enumerate(conv)
    ]
    layers += [(nn.Conv2d(16, 16, 3, padding=1, groups=16), c, "x") for c in depthwise]
    layers += [(nn.Conv1d(16, 8, 3, padding=1), c, "y") for c in conv1d]
    inputs = {"x": torch.randn(2, 16, 6, 6), "y": torch.randn(2, 16, 7)}
    run = export_and_run(tmp_path, layers, inputs)
    expected = [expected_emission(c, layer_of("", m).kind, 0) for m, c, _ in layers]
    assert run.emitted() == expected
    check_file_storage(run)
    dequantized = sum(e.startswith("DequantizeLinear") for e in expected)
    assert run.optimized["DequantizeLinear"] == dequantized  # each runs before its Conv
    assert run.optimized["Conv"] + run.optimized["FusedConv"] == len(layers)
    check_outputs(run)


def test_embedding_tables(tmp_path: Path):
    cases = [
        Case("int4", "group", 32),
        Case("uint4", "group", 16, False),
        Case("int4", "channel"),
        Case("uint4", "tensor", None, False),
        Case("int4", "group", 32, scale_format="e8m0"),
        Case("int4", "group", 24),
        Case("int8", "channel"),
        Case("fp8_e4m3", "channel"),
        Case("nf4", "group", 32),
        Case("fp4_e2m1", "group", 16),
        Case("int2", "group", 16),
    ]
    odd = [Case("int4", "group", 16), Case("uint4", "group", 32, False)]  # 48: a partial block
    torch.manual_seed(4)
    layers = [(nn.Embedding(100, 64), c, "x") for c in cases]
    layers += [(nn.Embedding(50, 48), c, "y") for c in odd]
    inputs = {"x": torch.randint(0, 100, (2, 5)), "y": torch.randint(0, 50, (3, 4))}
    run = export_and_run(tmp_path, layers, inputs)
    expected = [expected_emission(c, "embedding", m.embedding_dim) for m, c, _ in layers]
    assert run.emitted() == expected
    check_file_storage(run)
    assert run.optimized["GatherBlockQuantized"] == expected.count("GatherBlockQuantized")
    check_outputs(run)


# ---- quantized activations ---------------------------------------------------------------------


def test_linear_with_int8_activations(tmp_path: Path):
    uint8_dynamic = ActivationPlan("uint8", "tensor", dynamic=True, symmetric=False)
    layers = [
        (Case("int8", "channel", activation=INT8_DYNAMIC), "x", "DynamicQuantizeMatMul"),
        (
            Case("uint8", "channel", None, False, activation=INT8_DYNAMIC),
            "x",
            "DynamicQuantizeMatMul",
        ),
        (Case("int8", "tensor", activation=uint8_dynamic), "x0", "DynamicQuantizeMatMul"),
        (Case("int8", "channel", activation=INT8_STATIC), "x", "MatMulIntegerToFloat"),
        (
            Case("uint8", "channel", None, False, activation=UINT8_STATIC),
            "x",
            "MatMulIntegerToFloat",
        ),
        (Case("int8", "tensor", activation=INT8_STATIC), "x", "MatMulIntegerToFloat"),
        (Case("int8", "channel", activation=INT8_STATIC), "x0", "QGemm"),
        (Case("uint8", "tensor", None, False, activation=UINT8_STATIC), "x0", "QGemm"),
        (Case("int8", "channel", activation=INT8_TOKEN), "x", "MatMulInteger"),
        (Case("int4", "group", 32, activation=INT8_TOKEN), "x", "MatMulNBits"),
        (Case("uint4", "group", 16, False, activation=INT8_TOKEN), "x0", "MatMulNBits"),
    ]
    torch.manual_seed(5)
    modules = [nn.Linear(64, 24) for _ in layers]
    modules.append(nn.Linear(64, 24, bias=False))  # 2-D without bias: no Gemm fusion either
    layers.append((Case("int8", "channel", activation=INT8_STATIC), "x0", "MatMulIntegerToFloat"))
    x = torch.randn(2, 5, 64)
    x[0, 1] *= 4  # an outlier row: per-tensor and per-token scales differ
    run = export_and_run(
        tmp_path,
        [(m, c, r) for m, (c, r, _) in zip(modules, layers, strict=True)],
        {"x": x, "y": x},
    )
    kernels = Counter(kernel for _, _, kernel in layers)
    for kernel, count in kernels.items():
        assert run.optimized[kernel] == count, (kernel, run.optimized)
    # left over: the int32 bias of the three static layers on 3-D inputs, added after the kernel,
    # and the per-token layer's +128 code offset and float bias
    assert run.optimized["DequantizeLinear"] == 3
    assert run.optimized["Add"] == 5
    emitted = run.emitted()
    assert emitted[0] == "DynamicQuantizeMatMul"
    assert emitted[3] == "QDQ MatMul (MatMulIntegerToFloat/QGemm)"
    assert run.initializer("l0.codes").data_type == onnx.TensorProto.UINT8  # see modules.py
    check_outputs(run)


def test_conv_with_int8_activations_becomes_qlinearconv(tmp_path: Path):
    cases = [
        Case("int8", "channel", activation=INT8_STATIC),
        Case("uint8", "channel", None, False, activation=UINT8_STATIC),
        Case("int8", "tensor", activation=INT8_STATIC),
    ]
    torch.manual_seed(6)
    layers = [(nn.Conv2d(16, 8, 3, padding=1), c, "x") for c in cases]
    layers += [(nn.Conv2d(16, 16, 3, padding=1, groups=16), c, "x") for c in cases[:2]]
    layers.append((nn.Conv2d(16, 8, 1, bias=False), cases[0], "x"))
    layers.append((nn.Conv1d(16, 8, 3, padding=1), cases[1], "y"))
    inputs = {"x": torch.randn(2, 16, 6, 6), "y": torch.randn(2, 16, 7)}
    run = export_and_run(tmp_path, layers, inputs)
    assert set(run.emitted()) == {"QDQ Conv (QLinearConv)"}
    assert run.optimized["QLinearConv"] == len(layers)
    assert run.optimized["Conv"] == run.optimized["FusedConv"] == 0
    check_outputs(run)


# ---- what the target cannot run --------------------------------------------------------------


UNSUPPORTED = [
    ("linear", Case("int8", activation=ActivationPlan("fp8_e4m3", "tensor", True, True))),
    ("linear", Case("int8", activation=ActivationPlan("fp8_e5m2", "tensor", False, True))),
    ("linear", Case("int4", "group", 32, activation=INT8_DYNAMIC)),
    ("linear", Case("int4", "group", 32, activation=INT8_STATIC)),
    ("linear", Case("nf4", "group", 32, activation=INT8_STATIC)),
    ("linear", Case("fp4_e2m1", "group", 32, activation=INT8_DYNAMIC)),
    ("linear", Case("int3", "group", 32, activation=INT8_STATIC)),
    ("linear", Case("int3", "group", 32, activation=INT8_TOKEN)),
    ("linear", Case("fp8_e4m3", activation=INT8_STATIC)),
    ("linear", Case("fp8_e4m3", activation=INT8_TOKEN)),
    ("linear", Case("int8", "group", 32, activation=INT8_STATIC)),
    ("linear", Case("int8", activation=ActivationPlan("int8", "token", False, True))),
    ("linear", Case("int8", activation=ActivationPlan("int8", "token", True, False))),
    (
        "linear",
        Case("uint8", symmetric=False, activation=ActivationPlan("uint8", "token", True, False)),
    ),
    ("linear", Case("int4", "group", 24, activation=INT8_TOKEN)),
    ("conv", Case("int8", activation=INT8_DYNAMIC)),
    ("conv", Case("int8", activation=INT8_TOKEN)),
    ("conv", Case("int4", "group", 16, activation=INT8_STATIC)),
    ("conv", Case("fp8_e4m3", activation=INT8_STATIC)),
]


@pytest.mark.parametrize(("kind", "case"), UNSUPPORTED, ids=[f"{k}-{c}" for k, c in UNSUPPORTED])
def test_what_onnx_runtime_cannot_run_is_an_error_at_the_spec_line(kind: str, case: Case):
    module = nn.Linear(48, 8) if kind == "linear" else nn.Conv2d(16, 8, 3)
    x = torch.randn(4, 48) if kind == "linear" else torch.randn(1, 16, 5, 5)
    compressed = compress("layer", module, case, x)
    with pytest.raises(UserError, match="target onnx cannot run") as caught:
        lower(compressed, module)
    assert caught.value.diagnostic.span == ACTIVATION_SPAN


def test_what_this_backend_cannot_emit_is_an_error():
    module = nn.Linear(32, 8)
    compressed = compress("layer", module, Case("int8", activation=INT8_STATIC), torch.randn(4, 32))
    compressed.weight = None
    with pytest.raises(UserError, match="quantized activations alone"):
        lower(compressed, module)
    conv = nn.Conv2d(16, 8, 3)
    compressed = compress("conv", conv, Case("int8"), torch.randn(2, 16, 5, 5))
    compressed.lowrank = (np.zeros((8, 2), np.float16), np.zeros((2, 144), np.float16))
    with pytest.raises(UserError, match="low-rank compensation"):
        lower(compressed, conv)


def run_onnx(tmp_path: Path, module: nn.Module, compressed: CompressedLayer, x: torch.Tensor):
    """One compressed layer exported alone, run by ONNX Runtime."""
    holder = nn.Sequential(module).eval()
    graph = Graph(holder, {"input": x}, ("input",), {"0": compressed.layer}, "export")
    path = tmp_path / f"{id(compressed)}.onnx"
    emit(graph, {"0": compressed}, None, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def test_low_rank_branch_and_sparse_float_weights_run_in_onnx(tmp_path: Path):
    module = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    compressed = compress("layer", module, Case("int4", "group", 32, symmetric=False), x)
    rng = np.random.default_rng(0)
    up, down = rng.normal(size=(32, 4)), rng.normal(size=(4, 64))
    compressed.lowrank = (up.astype(np.float16), down.astype(np.float16))
    object.__setattr__(compressed.plan, "lowrank", LowRankPlan(4, "svd", 0, "fp16"))
    expected = x.numpy() @ compressed.effective_weight().T + compressed.bias
    np.testing.assert_allclose(run_onnx(tmp_path, module, compressed, x), expected, atol=1e-4)
    sparse = compress("layer", module, Case("int8"), x)
    sparse.weight, sparse.mask = None, rng.random((32, 64)) > 0.5
    expected = x.numpy() @ sparse.effective_weight().T + sparse.bias
    np.testing.assert_allclose(run_onnx(tmp_path, module, sparse, x), expected, atol=1e-5)


# ---- sizes and end to end ----------------------------------------------------------------------


def test_file_holds_packed_sizes(tmp_path: Path):
    """Low-bit layers take their theoretical minimum in the file (codes, scales, zero points)
    plus the float bias, up to what the kernels need: symmetric zero points for the integer
    kernels, per-channel scales repeated per MatMulNBits block, the decode path's codebook."""
    torch.manual_seed(7)
    layers = [
        (nn.Linear(256, 256), Case("int4", "group", 32, False), "x"),
        (nn.Linear(256, 256), Case("uint4", "group", 64, False), "x"),
        (nn.Linear(256, 256), Case("int8", "channel"), "x"),
        (nn.Linear(256, 256), Case("fp8_e4m3", "channel"), "x"),
        (nn.Linear(256, 256), Case("nf4", "group", 64), "x"),
        (nn.Linear(256, 256), Case("int3", "group", 128), "x"),
        (nn.Conv2d(64, 64, 3), Case("int4", "group", 32), "y"),
        (nn.Conv2d(64, 64, 3), Case("uint8", "channel", None, False), "y"),
        (nn.Embedding(512, 128), Case("int4", "group", 32), "z"),
        (nn.Embedding(512, 128), Case("uint4", "group", 32, False), "z"),
    ]
    inputs = {
        "x": torch.randn(1, 256),
        "y": torch.randn(1, 64, 5, 5),
        "z": torch.randint(0, 512, (1, 3)),
    }
    run = export_and_run(tmp_path, layers, inputs)
    minimum = 0
    for i, (module, case, _) in enumerate(layers):
        layer = run.qmodel[f"l{i}"].layer
        expected = nbytes(case.spec(), (layer.rows, layer.cols))["total"]
        expected += 0 if getattr(module, "bias", None) is None else layer.rows * 4
        stored = run.artifact.layer_bytes[f"l{i}"]
        extra = {"int8": layer.rows, "int3": 8 * 4, "nf4": 16 * 4}.get(case.format, 0)
        assert expected <= stored <= expected + extra, (run.emitted()[i], stored, expected)
        minimum += expected
    assert run.artifact.total_bytes < minimum * 1.02 + 16_000  # + the graph itself
    codes = run.initializer("l6.codes")  # 64 x 64 x 3 x 3 int4 weights, two per byte
    assert codes.data_type == onnx.TensorProto.INT4 and len(codes.raw_data) == 64 * 64 * 9 // 2


def test_digits_w8a8_runs_integer_convolutions(tmp_path: Path):
    build = qspec.compile(EXAMPLES / "digits_cnn" / "w8a8.qspec", tmp_path / "w8a8")
    emitted = {layer["name"]: layer["emitted"] for layer in build.manifest["layers"]}
    assert emitted == {
        "conv1": "float",
        "conv2": "QDQ Conv (QLinearConv)",
        "conv3": "QDQ Conv (QLinearConv)",
        "fc": "QDQ MatMul (MatMulIntegerToFloat/QGemm)",
    }
    assert build.fidelity.top1_agreement >= 0.95
    assert build.fidelity.accuracy_artifact >= build.fidelity.accuracy_float - 0.02
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "w8a8" / "model.onnx"), options)
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1
