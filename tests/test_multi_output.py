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
