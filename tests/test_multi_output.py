"""Models with several outputs: fidelity scores every output, the headline is the worst one's,
so `--fail-under` cannot pass while one output is bad (it once scored only the first)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qspec.cli import main
from qspec.verify import compare_outputs

# Two heads over x [N, 16]; RETURN builds what forward returns from a = self.a(x), b = self.b(x).
MODEL = """
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return RETURN


def load():
    torch.manual_seed(0)
    return M().eval(), {"x": torch.randn(4, 16)}


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        yield {"x": torch.randn(32, 16, generator=g)}
"""

SPEC = """qspec 1
model "multi.py:load"
calibration "multi.py:batches" samples 128 holdout 64
target onnx { device cpu }
layer "a" { keep }
layer "b" { weight B }
"""

# A tuple, and a dict whose keys are not in sorted order: the artifact's outputs must be
# matched to the float model's in the order the model returns them.
RETURNS = {
    "tuple": ("a, b", ["output[0]", "output[1]"]),
    "dict": (
        '{"logits": a, "aux": b}',
        ["output['logits']", "output['aux']"],
    ),
}


def _project(tmp_path: Path, returned: str, weight_b: str) -> Path:
    (tmp_path / "multi.py").write_text(MODEL.replace("RETURN", returned))
    spec = tmp_path / "multi.qspec"
    spec.write_text(SPEC.replace("B", weight_b))
    return spec


@pytest.mark.parametrize("kind", RETURNS)
def test_a_bad_second_output_fails_the_floor(kind: str, tmp_path: Path, capsys):
    """The user's reproduction: output `b` is int2 (cosine ~0.92), `a` is kept exact."""
    returned, names = RETURNS[kind]
    spec = _project(tmp_path, returned, "int2 tensor")
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out), "--fail-under", "cosine=0.99"]) == 1
    error = capsys.readouterr().err
    assert "cosine" in error and f"the worst of 2 outputs: {names[1]}" in error
    assert not out.exists()  # a failed build leaves no folder behind

    assert main(["compile", str(spec), "-o", str(out)]) == 0
    assert f"lowest cosine {names[1]}" in capsys.readouterr().out
    fidelity = json.loads((out / "report.json").read_text())["fidelity"]
    good, bad = fidelity["outputs"]
    assert [good["name"], bad["name"]] == names
    assert good["cosine_min"] > 0.9999 and bad["cosine_mean"] < 0.99
    for metric in ("cosine_mean", "cosine_min", "snr_db", "max_abs_error"):
        assert fidelity[metric] == bad[metric]  # the headline is the worst output's
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"][0]["fidelity"]["outputs"] == fidelity["outputs"]


def test_two_good_outputs_pass_and_are_each_listed(tmp_path: Path, capsys, monkeypatch):
    spec = _project(tmp_path, RETURNS["dict"][0], "int8 channel symmetric")
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out), "--fail-under", "cosine=0.99"]) == 0
    capsys.readouterr()
    text = (out / "report.json").read_text()
    fidelity = json.loads(text)["fidelity"]
    assert [o["name"] for o in fidelity["outputs"]] == RETURNS["dict"][1]
    assert all(o["cosine_mean"] > 0.99 for o in fidelity["outputs"])
    assert "Per output" in (out / "report.md").read_text()

    monkeypatch.setenv("QSPEC_CACHE_DIR", str(tmp_path / "fresh-cache"))  # compiled again
    again = tmp_path / "again"
    assert main(["compile", str(spec), "-o", str(again), "--fail-under", "cosine=0.99"]) == 0
    assert (again / "report.json").read_text() == text  # byte-reproducible


def test_a_single_output_report_has_no_outputs_list(tmp_path: Path, capsys):
    spec = _project(tmp_path, "a + b", "int8 channel symmetric")
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out)]) == 0
    assert "outputs" not in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "outputs" not in report["fidelity"]
    assert "Per output" not in (out / "report.md").read_text()


def test_worst_output_headline_and_first_output_top1():
    """A NaN in any output makes the headline NaN; top-1 is scored on the first output."""
    first = [np.eye(4, dtype="f4")]
    second = [np.ones((4, 3), "f4")]
    broken = [second[0].copy()]
    broken[0][1, 2] = np.nan
    labels = [np.arange(4)]
    fidelity = compare_outputs(
        ["output[0]", "output[1]"], [first + second], [first + broken], labels
    )
    assert np.isnan(fidelity.cosine_mean) and np.isnan(fidelity.snr_db)
    assert fidelity.top1_agreement == 1.0 and fidelity.accuracy_artifact == 1.0
    assert fidelity.worst_output() == "output[1]"
    single = compare_outputs(["output"], [first], [first], labels)
    assert single.outputs == () and "outputs" not in single.as_dict()


def _head(tmp_path: Path, returned: str, layer_b: str) -> Path:
    """A project whose outputs use only `b` (an unused `a` leaves the exported graph)."""
    spec = _project(tmp_path, returned, "int8 tensor")
    lines = [line for line in SPEC.splitlines() if not line.startswith("layer")]
    spec.write_text("\n".join([*lines, f'layer "b" {{ {layer_b} }}', ""]))
    return spec


def _compile(spec: Path, out: Path) -> int:
    return main(["compile", str(spec), "-o", str(out), "--fail-under", "cosine=0.99"])


def test_integer_ids_score_by_exact_agreement(tmp_path: Path, capsys):
    """Class ids (int64 [B]) from an int2 layer: cosine per sample once scored 1.0 while a
    quarter of the ids differed; now the score is the fraction of samples that agree."""
    spec = _head(tmp_path, "b.argmax(-1) + 1", "weight int2 tensor")
    assert _compile(spec, tmp_path / "bad") == 1
    assert "cosine" in capsys.readouterr().err

    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == 0
    fidelity = json.loads((tmp_path / "out" / "report.json").read_text())["fidelity"]
    assert fidelity["samples"] == 64 and fidelity["cosine_min"] == 0.0
    assert 0.0 < fidelity["cosine_mean"] < 0.99
    assert (fidelity["cosine_mean"] * 64).is_integer()  # the fraction of samples agreeing


def test_good_integer_ids_pass(tmp_path: Path):
    spec = _head(tmp_path, "b.argmax(-1) + 1", "keep")
    assert _compile(spec, tmp_path / "out") == 0
    fidelity = json.loads((tmp_path / "out" / "report.json").read_text())["fidelity"]
    assert fidelity["cosine_mean"] == fidelity["cosine_min"] == 1.0


def test_one_value_per_sample_is_scored_over_the_batch(tmp_path: Path, capsys):
    """A [B] output: each sample's cosine is only its sign (always 1 here), so the held-out
    column is one vector and a wrong value per sample fails the floor."""
    spec = _head(tmp_path, "(b * b).sum(-1)", "weight int2 tensor")  # positive: signs agree
    assert _compile(spec, tmp_path / "bad") == 1
    assert "cosine" in capsys.readouterr().err


def test_a_scalar_output_beside_batch_outputs(tmp_path: Path, capsys):
    """A 0-d output (one value per batch) once crashed verification (exit 3); its batches'
    values are compared as one vector, and the samples count the held-out rows."""
    spec = _head(tmp_path, "(x[:, :1] * 0 + 1.0, b.sum())", "weight int8 channel symmetric")
    out = tmp_path / "out"
    assert _compile(spec, out) == 0
    assert "fidelity on 64 held-out samples" in capsys.readouterr().out
    fidelity = json.loads((out / "report.json").read_text())["fidelity"]
    assert fidelity["samples"] == 64 and len(fidelity["outputs"]) == 2
    assert all(o["cosine_min"] > 0.99 for o in fidelity["outputs"])

    alone = _head(tmp_path, "b.sum()", "weight int8 channel symmetric")
    assert _compile(alone, tmp_path / "alone") == 0
    assert "fidelity on 64 held-out samples" in capsys.readouterr().out


def test_exact_and_column_scores():
    """Ids: the fraction of samples that agree; one value per sample or per batch (0-d): one
    cosine over the column, so a wrong magnitude with the right sign is caught."""
    ids = compare_outputs(["output"], [[np.array([1, 2, 3, 4])]], [[np.array([1, 2, 0, 4])]], None)
    assert (ids.cosine_mean, ids.cosine_min, ids.samples) == (0.75, 0.0, 4)
    column = compare_outputs(
        ["output"], [[np.array([1.0, 1.0], "f4")]], [[np.array([1.0, 9.0], "f4")]], None
    )
    assert column.cosine_mean == column.cosine_min < 0.8
    rows, scalar = np.ones((3, 2), "f4"), np.array(2.0, "f4")
    mixed = compare_outputs(["a", "b"], [[rows, scalar]] * 2, [[rows, scalar]] * 2, None)
    assert mixed.samples == 6 and mixed.cosine_min > 0.999999
