"""Shared test helper: a throwaway project folder with a model entry and a spec."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# The calibration entry of the token-id models below (and of tests' own models): 64 rows.
TOKEN_BATCHES = """
def batches():
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        yield {"ids": torch.randint(0, 50, (8, 6), generator=generator)}
"""

# An embedding and two Linear layers over token ids: a model that builds in seconds.
TINY_MODEL = (
    """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.embed(ids)))).mean(1)


def load():
    torch.manual_seed(0)
    return Tiny(), (torch.randint(0, 50, (4, 6)),)


"""
    + TOKEN_BATCHES
)

HEADER = 'qspec 1\nmodel "model.py:load"\ncalibration "model.py:batches" samples 32 holdout 16\n'


def write_project(folder: Path, model: str, body: str, name: str = "tiny.qspec") -> Path:
    """folder/model.py (defining load and batches) and folder/NAME: the header naming them,
    then `body`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(model)
    spec = folder / name
    spec.write_text(HEADER + body)
    return spec


def module_from_file(path: Path, name: str) -> ModuleType:
    """The Python file at `path` imported as module `name` (registered in sys.modules, which
    dataclasses and pickling look up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
