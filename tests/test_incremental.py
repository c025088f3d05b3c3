"""Incremental recompiles: per-layer results cached by content (`compiler.layercache`).

Each build logs one line per kind of cached result ("cache layer: 5 reused, 1 computed
(blocks.1.a)"); the tests read those, and compare artifacts with builds that cached nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from projects import TOKEN_BATCHES, write_project

import qspec
from qspec.compiler.cache import cache_settings
from qspec.compiler.layercache import Entry, LayerCache, digest
from qspec.compiler.resolve import SparsityPlan
from qspec.driver import compile_spec

# Three numbered blocks of two Linear layers: sequential calibration goes block by block.
BLOCKS_MODEL = (
    """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x.mean(1)


def load():
    torch.manual_seed(0)
    return Blocks(), (torch.randint(0, 50, (4, 6)),)
"""
    + TOKEN_BATCHES
)
GPTQ = 'layer "blocks.*.*" {\n  weight int4 group 16 asymmetric round gptq\n}\n'
NEAREST = 'layer "blocks.*.*" {\n  weight int4 group 16\n}\n'
EDIT = 'layer "blocks.1.a" {\n  weight int8\n}\n'
MIXED = (
    'layer "blocks.*.*" {\n  weight choose [int4 group 16, int8 channel]\n}\n'
    "budget {\n  weight bits <= 6\n}\n"
)


Counts = dict[str, tuple[int, int, list[str]]]


def build(spec: Path, out: Path) -> tuple[bytes, Counts]:
    """The model.onnx of a build, and per kind of cached result (of the passes, the last line
    of a kind): how many were reused, how many computed, and which (listed when some were
    reused)."""
    lines: list[str] = []
    compile_spec(spec, out, log=lines.append)
    counts = {}
    for line in lines:
        found = re.fullmatch(r"cache (\w+): (\d+) reused, (\d+) computed(?: \((.*)\))?", line)
        if found:
            names = found[4].split(", ") if found[4] else []
            counts[found[1]] = (int(found[2]), int(found[3]), names)
    return (out / "model.onnx").read_bytes(), counts


def uncached(spec: Path, out: Path) -> bytes:
    with cache_settings(enabled=False):
        onnx, counts = build(spec, out)
    assert counts == {}
    return onnx


def project(folder: Path, body: str, name: str = "spec.qspec") -> Path:
    return write_project(folder, BLOCKS_MODEL, body, name)


def test_cached_build_is_byte_identical(tmp_path: Path):
    """A comment changes the spec (no whole-build hit) but no result: everything is reused."""
    spec = project(tmp_path, GPTQ)
    cold, counts = build(spec, tmp_path / "cold")
    assert counts["layer"] == (0, 6, []) and counts["stats"] == (0, 6, [])
    spec.write_text(spec.read_text() + "# a comment\n")
    warm, counts = build(spec, tmp_path / "warm")
    assert counts["layer"] == (6, 0, []) and counts["stats"] == (6, 0, [])
    assert warm == cold == uncached(spec, tmp_path / "uncached")


def test_sequential_edit_recomputes_its_block_and_the_later_ones(tmp_path: Path):
    spec = project(tmp_path, GPTQ)
    build(spec, tmp_path / "before")
    spec.write_text(spec.read_text() + EDIT)
    edited, counts = build(spec, tmp_path / "after")
    # Block 1 sees the same inputs (block 0 is unchanged); block 2 sees block 1's new output.
    assert counts["stats"] == (4, 2, ["blocks.2.a", "blocks.2.b"])
    assert counts["layer"] == (3, 3, ["blocks.1.a", "blocks.2.a", "blocks.2.b"])
    assert edited == uncached(spec, tmp_path / "uncached")


def test_parallel_edit_recomputes_only_that_layer(tmp_path: Path):
    spec = project(tmp_path, NEAREST)
    build(spec, tmp_path / "before")
    spec.write_text(spec.read_text() + EDIT)
    edited, counts = build(spec, tmp_path / "after")
    assert counts["stats"] == (6, 0, [])
    assert counts["layer"] == (5, 1, ["blocks.1.a"])
    assert edited == uncached(spec, tmp_path / "uncached")


def test_damaged_entries_are_recomputed_and_replaced(tmp_path: Path, private_cache: Path):
    spec = project(tmp_path, NEAREST)
    cold, _ = build(spec, tmp_path / "cold")
    payloads = sorted((private_cache / "layers" / "layer").rglob("*.safetensors"))
    assert len(payloads) == 6
    truncated, flipped, hostile = payloads[:3]
    truncated.write_bytes(truncated.read_bytes()[:-10])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    # Sound as a file (its sha256 recorded), but arrays that do not fit the layer.
    wrong = safetensors.numpy.save({"codes": np.zeros((2, 2), np.uint8)}, metadata=_header(hostile))
    hostile.write_bytes(wrong)
    record = json.loads(hostile.with_suffix(".json").read_text())
    record.update(bytes=len(wrong), sha256=_sha256(wrong))
    hostile.with_suffix(".json").write_text(json.dumps(record))
    spec.write_text(spec.read_text() + "# rebuild\n")
    again, counts = build(spec, tmp_path / "again")
    assert counts["layer"][:2] == (3, 3)
    assert again == cold
    _, counts = build(spec, tmp_path / "third")  # the recomputed entries were written over
    assert counts["layer"] == (6, 0, [])


def test_sensitivity_is_reused(tmp_path: Path):
    spec = project(tmp_path, MIXED)
    cold, counts = build(spec, tmp_path / "cold")
    assert counts["option"] == (0, 12, [])  # 6 layers, 2 candidates each
    spec.write_text(spec.read_text() + "# rebuild\n")
    warm, counts = build(spec, tmp_path / "warm")
    assert counts["option"] == (12, 0, [])
    assert warm == cold


def test_sweep_points_reuse_the_candidates_results(tmp_path: Path):
    """Sensitivity compresses every candidate; each point's passes then only read them."""
    spec = project(tmp_path, MIXED)
    lines: list[str] = []
    qspec.sweep(spec, "weight bits=5,6", tmp_path / "sweep", log=lines.append)
    passes = [line for line in lines if line.startswith("cache layer")]
    assert passes == [
        "cache layer: 0 reused, 12 computed",  # sensitivity: 6 layers, 2 candidates each
        "cache layer: 6 reused, 0 computed",
        "cache layer: 6 reused, 0 computed",
    ]
    point = tmp_path / "sweep" / "weight-bits-5" / "model.onnx"
    spec.write_text(spec.read_text().replace("<= 6", "<= 5"))
    assert point.read_bytes() == uncached(spec, tmp_path / "uncached")


def test_an_unwritable_folder_caches_nothing_and_fails_nothing(tmp_path: Path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cache = LayerCache(blocked / "layers", "context")
    cache.save("layer", "ab" * 32, Entry({"x": 1}, {"a": np.ones(3)}))
    assert cache.load("layer", "ab" * 32, "x", lambda entry: entry) is None
    assert cache.computed["layer"] == ["x"]


def test_entries_keep_values_and_layout(tmp_path: Path):
    cache = LayerCache(tmp_path, "context")
    arrays = {"f": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "m": np.eye(2, dtype=bool)}
    cache.save("k", "cd" * 32, Entry({"inf": float("inf"), "notes": ["a"]}, arrays))
    entry = cache.load("k", "cd" * 32, "x", lambda entry: entry)
    assert entry is not None and entry.meta == {"inf": float("inf"), "notes": ["a"]}
    assert entry.arrays["f"].flags.f_contiguous and entry.arrays["m"].dtype == bool
    for name, array in arrays.items():
        assert np.array_equal(entry.arrays[name], array)


def test_keys_follow_contents_not_names():
    weight = np.zeros((2, 2), np.float32)
    assert digest(weight) != digest(weight.astype(np.float64))
    assert digest(weight) != digest(weight.reshape(4))
    assert digest((1, 2), 3) != digest(1, (2, 3))
    plan = SparsityPlan(2, 4, None, "magnitude")
    assert digest(plan) == digest(SparsityPlan(2, 4, None, "magnitude"))
    assert digest(plan) != digest(SparsityPlan(2, 4, None, "wanda"))
    with pytest.raises(TypeError):
        digest(object())


def _header(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
