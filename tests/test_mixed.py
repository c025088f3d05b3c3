"""Mixed precision end to end on a tiny model: sensitivity, the ILP's choice, ties, budgets
measured on the emitted artifact, infeasibility messages, evolution, explain and sweeps."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import onnx
import pytest
from projects import write_project

import qspec
from qspec.backends import cost_model
from qspec.cli import main
from qspec.compiler.capture import matrix
from qspec.compiler.errors import UserError
from qspec.compiler.state import State
from qspec.driver import prepare
from qspec.dsl.diagnostics import SpecError
from qspec.dsl.load import check_file
from qspec.pareto import parse_budget
from qspec.passes.allocate.sensitivity import measure
from qspec.passes.obs import output_error

MODEL = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 8)

    def forward(self, ids):
        h = torch.relu(self.fc1(self.embed(ids)))
        return self.fc3(torch.relu(self.fc2(h))).mean(1)


def load():
    torch.manual_seed(0)
    return Tiny(), (torch.randint(0, 50, (4, 6)),)


def batches():
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        yield {"ids": torch.randint(0, 50, (8, 6), generator=generator)}


def score(model):
    ids = torch.randint(0, 50, (16, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return -float(model(ids).square().mean())
"""

CHOOSE = """
layer "fc*" {
  weight choose [int2 group 32, int4 group 32, int8 channel]
}
"""


def project(tmp_path: Path, body: str, evaluate: bool = True) -> Path:
    header = 'evaluate "model.py:score"\n' * evaluate + "target onnx\n"
    return write_project(tmp_path, MODEL, header + body, "mixed.qspec")


def compiled(tmp_path: Path, body: str) -> dict:
    build = qspec.compile(project(tmp_path, body), tmp_path / "out")
    return build.manifest


def choices(manifest: dict) -> dict[str, int]:
    return {layer["name"]: layer["chosen"] for layer in manifest["allocation"]["layers"]}


def test_budgets_hold_on_the_emitted_artifact(tmp_path: Path):
    manifest = compiled(
        tmp_path, CHOOSE + "budget {\n  weight bits <= 4.5\n  size <= 13.5 KB\n}\nallocate ilp\n"
    )
    artifact = tmp_path / "out" / "model.onnx"
    assert artifact.stat().st_size == manifest["totals"]["artifact_bytes"] <= 13_500
    budgets = {b["limit"]: b for b in manifest["budgets"]}
    assert budgets["size <= 13.5 KB"]["met"]
    assert budgets["size <= 13.5 KB"]["measured"] == artifact.stat().st_size / 1000
    bits = budgets["weight bits <= 4.5"]
    assert bits["met"] and bits["measured"] <= 4.5 and bits["predicted"] == bits["measured"]
    # the bits measured from the emitted codes: every choosing layer's packed tensors
    model = onnx.load(str(artifact))
    layers = {entry["name"]: entry for entry in manifest["layers"]}
    for name, chosen in choices(manifest).items():
        candidate = manifest["allocation"]["layers"][int(name[-1]) - 1]["candidates"][chosen]
        assert layers[name]["choice"]["candidate"] == candidate["candidate"]
        assert layers[name]["bytes"] == candidate["bytes"]  # predicted bytes are exact
        codes = [t for t in model.graph.initializer if t.name.startswith(f"{name}.")]
        assert codes, name
    assert (tmp_path / "out" / "bits.png").stat().st_size > 1000
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Budgets" in report and "## Bits per layer" in report and "(chosen" not in report


def test_the_ilp_choice_is_optimal_for_the_measured_candidates(tmp_path: Path):
    manifest = compiled(tmp_path, CHOOSE + "budget {\n  weight bits <= 3.2\n}\n")
    layers = manifest["allocation"]["layers"]
    params = [entry["params"] - entry["shape"][0] for entry in manifest["layers"][1:]]
    best = min(
        (
            sum(layer["candidates"][c]["error"] for layer, c in zip(layers, combo, strict=True)),
            combo,
        )
        for combo in itertools.product(range(3), repeat=3)
        if sum(
            layer["candidates"][c]["bits"] * n
            for layer, c, n in zip(layers, combo, params, strict=True)
        )
        <= 3.2 * sum(params) + 1e-6
    )
    assert tuple(layer["chosen"] for layer in layers) == best[1]
    assert manifest["allocation"]["ilp"]["objective"] == pytest.approx(best[0])


def test_errors_fall_as_bits_rise_for_every_sensitivity(tmp_path: Path):
    spec = check_file(project(tmp_path, CHOOSE, evaluate=False)).raise_errors()
    prepared = prepare(spec)
    graph = prepared.graph
    for how in ("output", "hessian", "metric"):
        state = State.start(spec, graph, prepared.plan, prepared.calibration)
        sensitivity = measure(state, how, cost_model(), None, lambda _: None)
        for name, options in sensitivity.options.items():
            errors = [option.error for option in options]
            assert errors[0] > errors[1] > errors[2] - 1e-6, (how, name, errors)
        if how == "output":  # exactly trace(ΔW H ΔWᵀ) of the candidate's own compressed weight
            option = sensitivity.options["fc2"][1]
            weight = matrix(graph.layers["fc2"], graph.module.fc2.weight.detach()).numpy()
            delta = weight - option.weight
            assert option.error == pytest.approx(output_error(delta, state.stats["fc2"].hessian))
            assert (
                option.plan.weight is not None
                and option.plan.weight.quantizer.format.name == "int4"
            )


def test_tied_layers_share_one_choice(tmp_path: Path):
    body = CHOOSE + 'tie "fc{1,2}"\nbudget {\n  weight bits <= 3\n}\n'
    manifest = compiled(tmp_path, body)
    chosen = choices(manifest)
    assert chosen["fc1"] == chosen["fc2"]
    untied = compiled(tmp_path / "untied", CHOOSE + "budget {\n  weight bits <= 3\n}\n")
    assert choices(untied)["fc1"] != choices(untied)["fc2"]  # the tie changed the answer


def test_tied_layers_need_the_same_candidates(tmp_path: Path):
    body = CHOOSE + 'layer "fc3" {\n  weight choose [int4 group 32, int8 channel]\n}\n'
    body += 'tie "fc{2,3}"\n'
    with pytest.raises(SpecError) as caught:
        qspec.compile(project(tmp_path, body), tmp_path / "out")
    text = caught.value.render()
    assert "tied layers fc2 and fc3 choose among different candidates" in text
    assert "fc3 chooses here" in text


def test_an_infeasible_budget_names_the_least_achievable_and_the_layers(tmp_path: Path, capsys):
    body = 'layer "fc{1,2}" {\n  weight choose [int2 group 32, int4 group 32]\n}\n'
    body += 'layer "fc3" {\n  weight choose [int4 group 32, int8 channel]\n}\n'
    spec = project(tmp_path, body + "budget {\n  weight bits <= 2.01\n}\n")
    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert (
        "mixed.qspec:13:3: error: budget 'weight bits <= 2.01' cannot be met: the smallest "
        "achievable is 2.1538" in error
    )
    assert "these layers cannot get under it: fc3;" in error
    assert not (tmp_path / "out").exists()


def test_a_budget_without_candidates_is_checked_on_the_artifact(tmp_path: Path, capsys):
    body = 'layer "fc*" {\n  weight int8 channel\n}\nbudget {\n  size <= 5 KB\n}\n'
    spec = project(tmp_path, body)
    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == 1
    assert "budget not met: size <= 5 KB (measured 15.71)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # a failed build is not put in place


def test_evolution_starts_from_the_ilp_and_is_repeatable(tmp_path: Path):
    body = CHOOSE + "budget {\n  weight bits <= 3.5\n}\n"
    body += "allocate evolution generations 4 offspring 4 seed 3 fitness kl\n"
    first = compiled(tmp_path / "a", body)["allocation"]
    second = compiled(tmp_path / "b", body)["allocation"]
    assert first["evolution"]["best_fitness"] >= first["evolution"]["start_fitness"]
    final = [layer["chosen"] for layer in first["layers"]]
    if not first["evolution"]["accepted"]:  # no significant gain: the ILP's choice stays
        assert final == first["ilp"]["chosen"]
    else:
        gain = first["evolution"]["gain"]
        assert gain["mean"] > 2 * gain["standard_error"] and final != first["ilp"]["chosen"]
    assert first["evolution"]["history"] == second["evolution"]["history"]
    assert [layer["chosen"] for layer in first["layers"]] == [
        layer["chosen"] for layer in second["layers"]
    ]


def test_latency_budget_uses_measured_layer_times(tmp_path: Path):
    manifest = compiled(tmp_path, CHOOSE + "budget {\n  latency <= 50 ms\n}\n")
    candidates = manifest["allocation"]["layers"][0]["candidates"]
    assert all("latency_ms" in candidate for candidate in candidates)
    assert manifest["budgets"][0]["limit"] == "latency <= 50 ms"
    assert manifest["budgets"][0]["measured"] > 0


def test_explain_after_a_compile_shows_the_choices(tmp_path: Path, capsys):
    spec = project(tmp_path, CHOOSE + "budget {\n  weight bits <= 4\n}\n")
    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main(["explain", str(spec), "--build", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "choose among 3" not in table and "(chosen, " in table
    assert main(["explain", str(spec), "--build", str(tmp_path / "nothing")]) == 2


def test_sweep_writes_points_table_and_plot(tmp_path: Path, capsys):
    spec = project(tmp_path, CHOOSE + "budget {\n  weight bits <= 8\n}\n")
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--budget", "weight bits=1,2..", "-o", str(out)]) == 2
    rows = qspec.sweep(spec, "weight bits=1,2,8", out)
    assert rows == json.loads((out / "sweep.json").read_text())
    assert [row["budget"] for row in rows] == [
        "weight bits <= 1",
        "weight bits <= 2",
        "weight bits <= 8",
    ]
    assert "cannot be met" in rows[0]["status"]
    assert rows[1]["status"] == rows[2]["status"] == "ok"
    assert rows[1]["artifact_bytes"] < rows[2]["artifact_bytes"]
    assert rows[1]["cosine_mean"] < rows[2]["cosine_mean"]
    assert (out / "weight-bits-2" / "model.onnx").exists()
    assert (out / "sweep.png").stat().st_size > 1000
    assert "| weight bits <= 2 | 2.0 |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("weight bits=2.5..6 step 0.5", (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0)),
        ("size=8..16 step 4 MB", (8.0, 12.0, 16.0)),
        ("latency = 20, 30 ms", (20.0, 30.0)),
    ],
)
def test_budget_ranges(text: str, values: tuple[float, ...]):
    assert parse_budget(text).values == values


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bits=2..4 step 1", "'bits' is not a budget"),
        ("size=8..16 step 4", "a size sweep needs a unit"),
        ("size=8..16 step 4 ms", "'ms' is not a size unit"),
        ("weight bits=6..2 step 1", "LOW <= HIGH"),
        ("weight bits", "--budget expects"),
    ],
)
def test_bad_budget_ranges(text: str, message: str):
    with pytest.raises(UserError) as caught:
        parse_budget(text)
    assert message in str(caught.value)


def test_minilm_mixed_under_a_size_budget(tmp_path: Path):
    """The real model: two blocks choose under a size budget; the file meets it, and the
    allocator spends the bytes where the output error falls most."""
    examples = Path(__file__).parents[1] / "examples" / "minilm"
    spec = tmp_path / "mixed.qspec"
    spec.write_text(
        f'qspec 1\ninclude "{examples / "common.qspec"}"\n'
        'layer "bert.encoder.layer.{0,1}.*" {\n'
        "  weight choose [int3 group 32 asymmetric, int4 group 32 asymmetric, int8 channel]\n}\n"
        'layer "bert.encoder.layer.{2,3,4,5}.*" {\n  weight int4 group 32 asymmetric\n}\n'
        "budget {\n  size <= 55 MB\n}\n"
    )
    build = qspec.compile(spec, tmp_path / "out")
    size = (tmp_path / "out" / "model.onnx").stat().st_size
    assert size == build.manifest["totals"]["artifact_bytes"] <= 55e6
    chosen = {layer["chosen"] for layer in build.manifest["allocation"]["layers"]}
    assert len(build.manifest["allocation"]["layers"]) == 12 and len(chosen) > 1
    assert build.manifest["budgets"][0]["met"]
    assert build.fidelity.cosine_mean > 0.94  # the worst held-out source: measured 0.950


@pytest.mark.parametrize("where", ["user folder", "cwd", "empty"])
def test_sweep_refuses_folders_it_did_not_write(tmp_path: Path, monkeypatch, where: str):
    spec = project(tmp_path, CHOOSE + "budget {\n  weight bits <= 8\n}\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.md").write_text("my notes")
    monkeypatch.chdir(mine if where == "cwd" else tmp_path)
    out = {"user folder": str(mine), "cwd": ".", "empty": ""}[where]
    assert main(["sweep", str(spec), "--budget", "weight bits=2,8", "-o", out]) == 2
    assert (mine / "sweep.md").read_text() == "my notes"
    assert sorted(p.name for p in mine.iterdir()) == ["sweep.md"]
