"""Shared test helper: a throwaway project folder with a model entry and a spec."""

from __future__ import annotations

from pathlib import Path

HEADER = 'qspec 1\nmodel "model.py:load"\ncalibration "model.py:batches" samples 32 holdout 16\n'


def write_project(folder: Path, model: str, body: str, name: str = "tiny.qspec") -> Path:
    """folder/model.py (defining load and batches) and folder/NAME: the header naming them,
    then `body`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(model)
    spec = folder / name
    spec.write_text(HEADER + body)
    return spec
