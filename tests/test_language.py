"""Golden tests: each construct of the language parses to the IR it means."""

from __future__ import annotations

from pathlib import Path

import pytest

from qspec.dsl import ir
from qspec.dsl.load import check_file
from qspec.dsl.patterns import matches, tie_key

HEADER = "qspec 1\n"


def spec_of(body: str, path: str = "spec.qspec") -> ir.Spec:
    checked = check_file(path, text=HEADER + body)
    assert not checked.errors, "\n".join(d.render(checked.sources) for d in checked.errors)
    assert checked.spec is not None
    return checked.spec


def settings_of(body: str) -> tuple[ir.Setting, ...]:
    return spec_of(f'layer "x" {{\n{body}\n}}\n').rules[0].settings


def W(text: str) -> ir.Word:
    return ir.Word(text)


def N(value: float) -> ir.Num:
    return ir.Num(value)


def test_model_sources():
    assert spec_of('model "model.py:load"').model == ir.ModelSource("python", W("model.py:load"))
    assert spec_of('model hf "ckpt/minilm"').model == ir.ModelSource("hf", W("ckpt/minilm"))
    assert spec_of('model exported "m.pt2"').model == ir.ModelSource("exported", W("m.pt2"))


def test_calibration_and_evaluate():
    spec = spec_of(
        'calibration "data.npz" samples 64 holdout 8 mode sequential\nevaluate "m.py:score"'
    )
    source = ir.DataSource(W("data.npz"))
    assert spec.calibration == ir.Calibration((source,), N(64), N(8), W("sequential"))
    assert spec.evaluate == ir.Evaluate(W("m.py:score"))
    one = ir.Calibration((ir.DataSource(W("m.py:batches")),))
    assert spec_of('calibration "m.py:batches"').calibration == one


def test_calibration_mix_and_verify_sources():
    spec = spec_of(
        'calibration "d.py:wiki" weight 3, "d.py:code", "c.npz" weight 0.5 samples 90\n'
        'verify "d.py:news" samples 40\nverify "other.npz"'
    )
    assert spec.calibration == ir.Calibration(
        (
            ir.DataSource(W("d.py:wiki"), N(3)),
            ir.DataSource(W("d.py:code")),
            ir.DataSource(W("c.npz"), N(0.5)),
        ),
        N(90),
    )
    assert spec.verify == (ir.Verify(W("d.py:news"), N(40)), ir.Verify(W("other.npz")))


def test_targets():
    spec = spec_of(
        "target onnx { device cpu opset 21 }\n"
        "target onnx as gpu { device cuda }\n"
        "target tvm { device cuda arch sm_90 tune trials 64 }\n"
        "target tvm as host { device llvm mcpu znver3 }\n"
    )
    onnx, gpu, tvm, host = spec.targets
    assert onnx == ir.Target(W("onnx"), device=W("cpu"), opset=N(21))
    assert gpu.name == "gpu" and gpu.device == W("cuda")
    assert tvm == ir.Target(W("tvm"), device=W("cuda"), arch=W("sm_90"), tune_trials=N(64))
    assert host.mcpu == W("znver3")
    assert spec_of("target onnx").targets == (ir.Target(W("onnx")),)


def test_weight_statement_options():
    (weight,) = settings_of(
        "weight int4 group 32 asymmetric scale fp16 round gptq damp 0.02 actorder search clip"
    )
    assert weight == ir.Weight(
        W("int4"),
        ir.WeightOptions(
            granularity=ir.Granularity("group", N(32)),
            symmetric=ir.Flag(False),
            scale=W("fp16"),
            rounding=ir.Rounding(W("gptq"), N(0.02), ir.Flag(True)),
            search=ir.Search((W("clip"),)),
        ),
    )


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("int2", "int2"),
        ("int3", "int3"),
        ("int8", "int8"),
        ("uint4", "uint4"),
        ("fp8", "fp8_e4m3"),
        ("fp8_e5m2", "fp8_e5m2"),
        ("fp4", "fp4_e2m1"),
        ("fp4_e1m2", "fp4_e1m2"),
        ("fp4_e3m0", "fp4_e3m0"),
        ("nf4", "nf4"),
    ],
)
def test_weight_formats_and_aliases(written, canonical):
    (weight,) = settings_of(f"weight {written} channel")
    assert weight.format == W(canonical)


def test_granularities_and_scale_formats():
    assert settings_of("weight int8 tensor")[0].options.granularity == ir.Granularity("tensor")
    (mx,) = settings_of("weight fp4 group 32 scale e8m0")
    assert mx.options.scale == W("e8m0")
    (nv,) = settings_of("weight fp4 group 16 scale fp8 search format")
    assert nv.options.search == ir.Search((W("format"),))


def test_choose_with_combined_candidates():
    (weight,) = settings_of(
        "weight choose [int3 group 32 rank 16 by eora, int4 group 32 sparsity 2:4 by wanda,"
        " fp8_e4m3 channel, keep,] round gptq"
    )
    int3, int4, fp8, keep = weight.candidates
    assert weight.format is None
    assert weight.options.rounding == ir.Rounding(W("gptq"))
    assert int3.lowrank == ir.LowRank(N(16), W("eora"))
    assert int4.sparsity == ir.Sparsity(ir.NofM(N(2), N(4)), W("wanda"))
    assert fp8.options.granularity == ir.Granularity("channel")
    assert keep.keep and not int3.keep


def test_activation_forms():
    (act,) = settings_of("activation int8 token dynamic asymmetric")
    assert act == ir.Activation(W("int8"), ir.Granularity("token"), ir.Flag(False), ir.Flag(True))
    assert settings_of("activation fp8 tensor static")[0].dynamic == ir.Flag(False)
    assert settings_of("activation none")[0] == ir.Activation(None)
    (calibrated,) = settings_of("activation uint8 static calibrate percentile 99.99")
    assert calibrated.calibrate == ir.Calibrate(W("percentile"), N(99.99))
    assert settings_of("activation int8 static calibrate entropy")[0].calibrate == ir.Calibrate(
        W("entropy")
    )


def test_sparsity_forms():
    assert settings_of("sparsity 2:4 by sparsegpt")[0] == ir.Sparsity(
        ir.NofM(N(2), N(4)), W("sparsegpt")
    )
    half = settings_of("sparsity 50%")[0].pattern
    assert isinstance(half, ir.Ratio) and half.fraction == 0.5
    assert settings_of("sparsity 0.3 by magnitude")[0].pattern.fraction == pytest.approx(0.3)
    assert settings_of("sparsity none")[0] == ir.Sparsity(None)


def test_compensation_forms():
    lora, bias = settings_of(
        "compensate lora rank 32 by eora finetune steps 200 factors int8\ncompensate bias"
    )
    assert lora == ir.LowRank(N(32), W("eora"), N(200), W("int8"))
    assert bias == ir.BiasCorrection()
    assert settings_of("compensate none") == (ir.CompensateNone(),)


def test_keep_defaults_and_precedence_order():
    spec = spec_of(
        'layer "a.*" { weight int4 }\ndefaults { weight int8 channel }\n'
        'layer "a.b" { keep }\ndefaults { activation int8 }\n'
    )
    kinds = [type(r).__name__ for r in spec.rules]
    assert kinds == ["Defaults", "Defaults", "LayerRule", "LayerRule"]
    assert spec.rules[3].settings == (ir.Keep(),)


def test_budgets_and_units():
    spec = spec_of(
        "target onnx\nbudget {\n weight bits <= 4.5\n size <= 12 MB\n bops <= 3 G\n"
        " latency <= 800 us\n}\n"
    )
    amounts = {limit.metric: limit.amount for limit in spec.limits}
    assert amounts["weight_bits"] == 4.5
    assert amounts["bops"] == 3e9
    assert amounts["latency"] == pytest.approx(8e-4)
    assert amounts["size"] == 12e6
    assert spec_of("budget { size <= 1 GiB }").limits[0].amount == 2**30


def test_latency_names_its_target():
    spec = spec_of(
        "target onnx\ntarget tvm as tvm_gpu { device cuda }\nbudget { latency <= 5 ms on tvm_gpu }"
    )
    assert spec.limits[0].target == W("tvm_gpu")


def test_allocation_strategies():
    body = 'layer "x" { weight choose [int4, int8] }\n'
    assert spec_of(body + "allocate ilp").allocate == ir.Allocate(W("ilp"))
    evo = spec_of(body + "allocate evolution generations 40 offspring 16 seed 3 fitness kl")
    assert evo.allocate == ir.Allocate(W("evolution"), N(40), N(16), N(3), W("kl"))


def test_include_splices_in_place(tmp_path: Path):
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "base.qspec").write_text(
        'qspec 1\ntarget onnx\ndefaults { weight int8 channel }\nlayer "a" { keep }\n'
    )
    main = tmp_path / "main.qspec"
    main.write_text('qspec 1\nlayer "b" { weight int4 }\ninclude "team/base.qspec"\n')
    checked = check_file(main)
    assert not checked.errors
    spec = checked.spec
    assert [t.name for t in spec.targets] == ["onnx"]
    assert [r.pattern.text for r in spec.layer_rules] == ["b", "a"]
    assert spec.files == (str(main), str(tmp_path / "team" / "base.qspec"))


def test_spans_point_at_the_source():
    spec = spec_of('layer "x" {\n  weight int4 group 32\n}\n')
    weight = spec.rules[0].settings[0]
    assert (weight.span.line, weight.span.column) == (3, 3)
    assert (weight.format.span.line, weight.format.span.column) == (3, 10)
    assert weight.options.granularity.span.end_column == 23


def test_glob_and_regex_patterns():
    glob = ir.Pattern("encoder.layer.*.attention.{query,key}")
    assert matches(glob, "encoder.layer.11.attention.query")
    assert not matches(glob, "encoder.layer.1.attention.value")
    assert matches(ir.Pattern("layer.[0-2].fc"), "layer.2.fc")
    assert not matches(ir.Pattern("layer.[!0].fc"), "layer.0.fc")
    regex = ir.Pattern(r"layer\.(\d+)\.fc", regex=True)
    assert matches(regex, "layer.12.fc") and not matches(regex, "layer.12.fc2")


def test_tie_groups_by_wildcards():
    tie = ir.Pattern("encoder.layer.*.self.{query,key,value}")
    assert tie_key(tie, "encoder.layer.3.self.key") == ("3",)
    assert tie_key(tie, "encoder.layer.3.self.query") == tie_key(tie, "encoder.layer.3.self.key")
    assert tie_key(tie, "encoder.layer.3.out") is None
    assert tie_key(ir.Pattern("a.{x,y}"), "a.x") == ()


def test_examples_check_clean():
    examples = sorted(Path(__file__).parents[1].glob("examples/*/*.qspec"))
    assert len(examples) >= 4
    for example in examples:
        checked = check_file(example)
        assert not checked.errors, example


def test_a_file_included_twice_counts_once(tmp_path: Path):
    (tmp_path / "common.qspec").write_text("qspec 1\ntarget onnx\n")
    (tmp_path / "a.qspec").write_text('qspec 1\ninclude "common.qspec"\n')
    main = tmp_path / "main.qspec"
    main.write_text('qspec 1\ninclude "a.qspec"\ninclude "common.qspec"\n')
    checked = check_file(main)
    assert not checked.errors
    assert [t.name for t in checked.spec.targets] == ["onnx"]


def test_checks_that_need_inherited_fields_wait_for_resolution():
    # The group may come from defaults: only the resolved layer knows.
    spec_of('defaults { weight int4 group 32 }\nlayer "x" { weight fp4 scale e8m0 }')


def test_keywords_are_names_where_only_a_name_fits():
    spec = spec_of('target tvm as layer { device llvm mcpu "skylake-avx512" }')
    assert spec.targets[0].name == "layer"
    assert spec.targets[0].mcpu == W("skylake-avx512")
