"""Reproducible builds: the same spec and inputs give the same bytes in every artifact, whatever
the hash seed, the output folder or the cache, and no artifact names a path of the machine that
built it (so a build can be checked by rebuilding it anywhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from projects import TINY_MODEL, write_project

ROOT = Path(__file__).resolve().parents[1]
BODY = """
target onnx { device cpu }
target tvm { device llvm }
layer "fc*" { weight int4 group 32 }
"""


def compile_fresh(spec: Path, out: Path, seed: int) -> None:
    """A compile in its own process (its own hash seed and heap layout) with an empty cache, so
    nothing is restored from an earlier build."""
    env = dict(os.environ, PYTHONHASHSEED=str(seed), QSPEC_CACHE_DIR=str(out.with_suffix(".cache")))
    command = [sys.executable, "-m", "qspec", "compile", str(spec), "-o", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def artifact_files(build: Path) -> list[str]:
    """Every file the manifest's targets name (model.onnx, tvm/model.so, tvm/params.bin, ...)."""
    targets = json.loads((build / "manifest.json").read_text())["targets"]
    names = {entry[key] for entry in targets for key in ("file", "params") if key in entry}
    return sorted(names)


def test_two_compiles_give_the_same_bytes_and_no_paths(tmp_path: Path):
    spec = write_project(tmp_path / "project", TINY_MODEL, BODY)
    first, second = tmp_path / "first", tmp_path / "second-build"
    compile_fresh(spec, first, seed=1)
    compile_fresh(spec, second, seed=2)
    files = artifact_files(first)
    assert files == artifact_files(second)
    assert {"model.onnx", "tvm/model.so", "tvm/params.bin"} <= set(files)
    machine_paths = [p for p in (str(tmp_path), str(ROOT), str(Path.home())) if p != "/"]
    for name in files:
        data = (first / name).read_bytes()
        assert data == (second / name).read_bytes(), f"{name} differs between two compiles"
        for path in machine_paths:
            assert os.fsencode(path) not in data, f"{name} contains the build machine's {path}"
