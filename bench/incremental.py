"""Incremental recompiles: one layer's format changed in examples/minilm/gptq.qspec, rebuilt on
the per-layer cache, against the cold build of the spec as it was.

Run: .venv/bin/python bench/incremental.py [--repeat 1] [--check]
Writes bench/results/incremental.json. examples/minilm is copied into a temporary folder (the
spec's paths are relative to it), and for each variant, with a fresh cache folder:
- cold: `qspec compile` with the cache empty (it fills it);
- incremental: the copy gets a rule at its end (`EDIT`) and is compiled again. The spec's text
  changed, so the whole-build cache cannot serve it: what is reused is the per-layer cache.
Variants: the spec as shipped (ONNX and TVM targets), and the same without its TVM target: the
ONNX artifact is exported by pieces, a TVM library is imported and compiled whole (TVM 0.27
cannot serialize a Relax module to cache it, see docs/build-systems.md).
Wall times are medians of `--repeat` runs of the whole `qspec` process (interpreter start,
imports and model loading included); stage times are the `--timings` lines of the last run.
`--check` also builds the edited spec with `--no-cache` and compares the artifacts' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ort_runs import flag_summary

from qspec.compiler.host import cpu_name

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "results" / "incremental.json"
QSPEC = [sys.executable, "-m", "qspec"]
SPEC = "gptq.qspec"
LAYER = "bert.encoder.layer.5.output.dense"
EDIT = f'\nlayer "{LAYER}" {{\n  weight int8\n}}\n'
TARGET = 0.30  # the incremental build must take under this fraction of the cold one
ARTIFACTS = ("model.onnx", "tvm/model.so", "tvm/params.bin")


def compile_spec(spec: Path, out: Path, env: dict[str, str], *extra: str) -> tuple[float, str]:
    """Wall seconds of one `qspec compile --timings` process, and its stderr."""
    command = [*QSPEC, "compile", str(spec), "-o", str(out), "--timings", "--progress=never"]
    start = time.perf_counter()
    run = subprocess.run([*command, *extra], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr}")
    return seconds, run.stderr


def stages(log: str) -> dict[str, float]:
    """The `--timings` lines: stage -> seconds."""
    found = re.findall(r"^  ([a-z][\w ]*): ([\d.]+) s$", log, re.MULTILINE)
    return {stage: float(seconds) for stage, seconds in found}


def cache_lines(log: str) -> list[str]:
    return re.findall(r"^  (cache \w+: .*)$", log, re.MULTILINE)


def measure(folder: Path, text: str, repeat: int, check: bool) -> dict:
    """Cold and incremental builds of one spec text (in the copy of examples/minilm)."""
    cold, incremental = [], []
    env = {**os.environ, "QSPEC_CACHE_DIR": str(folder / "cache")}
    spec = folder / "minilm" / SPEC
    for _ in range(repeat):
        for path in ("cache", "minilm", "cold", "incremental", "uncached"):
            shutil.rmtree(folder / path, ignore_errors=True)
        shutil.copytree(ROOT / "examples" / "minilm", folder / "minilm")
        spec.write_text(text)
        seconds, cold_log = compile_spec(spec, folder / "cold", env)
        cold.append(seconds)
        spec.write_text(text + EDIT)
        seconds, incremental_log = compile_spec(spec, folder / "incremental", env)
        incremental.append(seconds)
    identical = None
    if check:
        compile_spec(spec, folder / "uncached", env, "--no-cache")
        identical = {
            name: (folder / "incremental" / name).read_bytes()
            == (folder / "uncached" / name).read_bytes()
            for name in ARTIFACTS
            if (folder / "uncached" / name).exists()
        }
    ratio = statistics.median(incremental) / statistics.median(cold)
    return {
        "cold_s": round(statistics.median(cold), 2),
        "incremental_s": round(statistics.median(incremental), 2),
        "ratio": round(ratio, 3),
        "target_met": ratio < TARGET,
        "runs_s": {
            "cold": [round(s, 2) for s in cold],
            "incremental": [round(s, 2) for s in incremental],
        },
        "stages_s": {"cold": stages(cold_log), "incremental": stages(incremental_log)},
        "cache": cache_lines(incremental_log),
        "artifacts_identical_to_uncached": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="compare with an uncached build")
    args = parser.parse_args()
    shipped = (ROOT / "examples" / "minilm" / SPEC).read_text()
    onnx_only = re.sub(r"(?m)^target tvm .*\n", "", shipped)
    assert onnx_only != shipped, "the shipped spec has no TVM target to drop"
    variants = {}
    with tempfile.TemporaryDirectory(prefix="qspec-incremental-") as scratch:
        for name, text in (("onnx+tvm (as shipped)", shipped), ("onnx only", onnx_only)):
            variants[name] = measure(Path(scratch), text, args.repeat, args.check)
    result = {
        "command": "bench/incremental.py" + f" --repeat {args.repeat}" + " --check" * args.check,
        "spec": f"examples/minilm/{SPEC}",
        "edit": EDIT.strip(),
        "target_ratio": TARGET,
        "variants": variants,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cpu": cpu_name(),
            "flags": flag_summary(),
            "python": platform.python_version(),
        },
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
