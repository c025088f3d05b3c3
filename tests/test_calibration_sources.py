"""Calibration mixed from several sources, `verify` sources never calibrated on, and the
held-out report per source (mean, 1st percentile, minimum), with the worst as the headline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from projects import TINY_MODEL, module_from_file

import qspec
from qspec.cli import main
from qspec.compiler.source import shares
from qspec.dsl.diagnostics import SpecError
from qspec.verify import Fidelity

# Token ids from three "domains": the low ids, the high ids, and all of them.
SOURCES = """

def low():
    generator = torch.Generator().manual_seed(2)
    for _ in range(6):
        yield {"ids": torch.randint(0, 25, (8, 6), generator=generator)}


def high():
    generator = torch.Generator().manual_seed(3)
    for _ in range(6):
        yield {"ids": torch.randint(25, 50, (8, 6), generator=generator)}
"""

LAYERS = 'layer "fc*" {\n  weight int4 group 32\n}\n'


def project(folder: Path, statements: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(TINY_MODEL + SOURCES)
    spec = folder / "mix.qspec"
    spec.write_text(f'qspec 1\nmodel "model.py:load"\n{statements}\n{LAYERS}')
    return spec


@given(st.integers(1, 10_000), st.lists(st.floats(0.01, 100), min_size=1, max_size=6))
def test_shares_add_up_give_each_source_a_row_and_follow_the_weights(total, weights):
    if total < len(weights):
        return  # the spec refuses fewer rows than sources
    counts = shares(total, weights)
    assert sum(counts) == total and min(counts) >= 1
    assert counts == shares(total, weights)
    exact = [total * w / sum(weights) for w in weights]
    # within a row of the exact share, but for the rows the one-row floors moved
    floors = sum(1 for x in exact if x < 1)
    assert all(abs(c - x) < 1 + floors + 1e-9 for c, x in zip(counts, exact, strict=True))


def test_each_source_is_verified_alone_and_the_worst_is_the_headline(tmp_path: Path):
    spec = project(
        tmp_path,
        'calibration "model.py:low" weight 3, "model.py:batches" samples 32 holdout 16\n'
        'verify "model.py:high" samples 24',
    )
    build = qspec.compile(spec, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sources = report["fidelity"]["sources"]
    assert [s["source"] for s in sources] == ["model.py:low", "model.py:batches", "model.py:high"]
    assert [s["samples"] for s in sources] == [12, 4, 24]  # holdout 16 split 3:1, then verify
    assert report["fidelity"]["samples"] == 40
    assert build.fidelity is not None
    assert build.fidelity.cosine_mean == min(f.cosine_mean for _, f in build.fidelity.sources)
    assert build.fidelity.cosine_p1 == min(f.cosine_p1 for _, f in build.fidelity.sources)
    for _, each in build.fidelity.sources:
        assert each.cosine_min <= each.cosine_p1 <= each.cosine_mean
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["calibration"]["sources"] == ["model.py:low", "model.py:batches"]
    assert manifest["calibration"]["verify"] == ["model.py:high"]
    assert manifest["calibration"]["samples"] == 32
    assert "| model.py:high | 24 |" in (tmp_path / "out" / "report.md").read_text()


def test_a_verify_source_changes_the_build_key_not_the_calibration(tmp_path: Path):
    """Adding a verify source verifies on more rows; what is calibrated on stays the same."""
    plain = project(tmp_path / "a", 'calibration "model.py:low" samples 24 holdout 8')
    more = project(
        tmp_path / "b",
        'calibration "model.py:low" samples 24 holdout 8\nverify "model.py:high" samples 24',
    )
    first = qspec.compile(plain, tmp_path / "a" / "out")
    second = qspec.compile(more, tmp_path / "b" / "out")
    assert first.fidelity is not None and second.fidelity is not None
    assert not first.fidelity.sources and len(second.fidelity.sources) == 2
    low = dict(second.fidelity.sources)["model.py:low"]
    assert low.cosine_mean == pytest.approx(first.fidelity.cosine_mean, abs=1e-6)


def test_cosine_p1_floor_fails_the_build(tmp_path: Path, capsys):
    spec = project(tmp_path, 'calibration "model.py:low", "model.py:high" samples 32 holdout 16')
    code = main(["compile", str(spec), "-o", str(tmp_path / "out"), "--fail-under", "cosine_p1=1"])
    assert code == 1
    assert "cosine_p1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        (
            'calibration "model.py:low" weight 0 samples 8',
            "mix.qspec:3:35: error: a source's weight must be above 0",
        ),
        (
            'calibration "model.py:low", "model.py:low" samples 8',
            "mix.qspec:3:29: error: 'model.py:low' is named twice",
        ),
        (
            'calibration "model.py:low", "model.py:high", "model.py:batches" holdout 2',
            "mix.qspec:3:73: error: 2 rows cannot be shared by 3 sources",
        ),
        (
            'calibration "model.py:low"\nverify "model.py:low"',
            "mix.qspec:4:8: error: 'model.py:low' is also a calibration source",
        ),
        ('calibration "model.py:low"\nverify "notes.txt"', "is not a verification source"),
    ],
    ids=["zero-weight", "twice", "too-few-rows", "verify-calibrated", "verify-not-data"],
)
def test_bad_sources_are_spec_errors(tmp_path: Path, statements: str, message: str):
    spec = project(tmp_path, statements)
    with pytest.raises(SpecError) as caught:
        qspec.compile(spec, tmp_path / "out")
    assert message in caught.value.render()


def test_a_short_verify_source_names_itself(tmp_path: Path):
    statements = 'calibration "model.py:low" samples 8 holdout 8\n'
    statements += 'verify "model.py:high" samples 500'
    spec = project(tmp_path, statements)
    with pytest.raises(SpecError) as caught:
        qspec.compile(spec, tmp_path / "out")
    assert "'model.py:high' has 48 samples; the spec asks for 500 to verify on" in (
        caught.value.render()
    )


def _fidelity(mean: float, sem: float, samples: int) -> Fidelity:
    return Fidelity(samples, mean, mean - 0.01, mean - 0.005, sem, 30.0, 0.1)


def test_too_few_samples_to_resolve_the_build_from_float_is_said():
    assert _fidelity(0.99, 0.001, 500).unresolved() is None
    why = _fidelity(0.999, 0.001, 16).unresolved()
    assert why is not None and "16 held-out samples" in why and "hold out about" in why
    assert _fidelity(1.0, 0.0, 16).unresolved() is None  # exact: nothing to resolve


PADDED_MODEL = """
import torch
from torch import nn


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        with torch.no_grad():
            self.embed.weight[0] = 100.0  # the padding id: far outside the real tokens' range
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, input_ids, attention_mask):
        hidden = self.fc2(torch.relu(self.fc1(self.embed(input_ids))))
        mask = attention_mask.unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)


def load():
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (2, 6))
    return Masked(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def batches():
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        ids = torch.randint(1, 50, (8, 10), generator=generator)
        lengths = torch.randint(2, 11, (8,), generator=generator)
        mask = (torch.arange(10) < lengths[:, None]).long()
        yield {"input_ids": ids * mask, "attention_mask": mask}
"""


def test_padded_positions_are_left_out_of_the_statistics(tmp_path: Path):
    from qspec.compiler.state import State
    from qspec.driver import prepare
    from qspec.dsl.load import check_file
    from qspec.passes import calibrate

    (tmp_path / "model.py").write_text(PADDED_MODEL)
    spec_path = tmp_path / "padded.qspec"
    spec_path.write_text(
        'qspec 1\nmodel "model.py:load"\ncalibration "model.py:batches" samples 32 holdout 16\n'
        'layer "fc*" {\n  weight int4 group 32 round gptq\n}\n'
    )
    prepared = prepare(check_file(spec_path).raise_errors())
    state = State.start(prepared.spec, prepared.graph, prepared.plan, prepared.calibration)
    stats = calibrate.run(state).stats["fc1"]
    real = sum(int(b["attention_mask"].sum()) for b in prepared.calibration.batches)
    assert stats.samples == real < 32 * 10
    assert stats.input_max < 10  # the padding embedding (100) never reached the statistics
    embedded = [
        prepared.graph.module.embed(b["input_ids"])[b["attention_mask"].bool()]
        for b in prepared.calibration.batches
    ]
    x = torch.cat(embedded).double().detach()
    assert stats.xtx is not None
    np.testing.assert_allclose(stats.xtx, (x.T @ x).numpy(), rtol=1e-9)


def test_unpacking_the_text_wheel_writes_only_its_six_files(tmp_path: Path):
    import zipfile

    folder = "exllamav2/conversion/standard_cal_data"
    wheel = tmp_path / "text.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("wiki", "c4", "code", "technical", "multilingual", "tiny"):
            archive.writestr(f"{folder}/{name}.utf8", f"{name} text")
        archive.writestr(f"{folder}/../../../../escape.utf8", "outside")
        archive.writestr("exllamav2/other.utf8", "elsewhere")
    path = Path(__file__).parents[1] / "examples" / "data" / "unpack.py"
    unpack = module_from_file(path, "qspec_example_unpack").unpack
    written = unpack(wheel, tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(p.name for p in written)
    assert len(written) == 6 and (tmp_path / "data" / "wiki.utf8").read_text() == "wiki text"
    assert not list(tmp_path.rglob("escape.utf8")) and not (tmp_path / "data.partial").exists()
    with pytest.raises(SystemExit, match="exists"):
        unpack(wheel, tmp_path / "data")  # never over a folder that is there
