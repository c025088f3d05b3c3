"""The build cache against a cold build, both through the `qspec` command as a build tool runs it.

Run: .venv/bin/python bench/cache_minilm.py [--spec examples/minilm/int4.qspec] [--repeat 3]
Writes bench/results/cache_minilm.md. In one run, with a fresh cache folder:
- cold: the folder and the cache are empty, so qspec loads the model and compiles;
- hit: the folder is removed, the cache holds the build: restored without loading torch;
- up to date: `--check` on the folder that is in place (what `make` would ask first).
Wall times are medians of `--repeat` runs of the whole process (interpreter start included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ort_runs import flag_summary

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "results" / "cache_minilm.md"
QSPEC = [sys.executable, "-m", "qspec"]
TARGET = 0.15  # a hit must take under this fraction of a cold build


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr}")
    return seconds, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default=str(ROOT / "examples" / "minilm" / "int4.qspec"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qspec-cache-bench-") as scratch:
        env = {**os.environ, "QSPEC_CACHE_DIR": str(Path(scratch) / "cache")}
        out = Path(scratch) / "build"
        compile_ = [*QSPEC, "compile", args.spec, "-o", str(out), "--json", "--progress=never"]
        cold, hit, check = [], [], []
        for _ in range(args.repeat):
            shutil.rmtree(Path(scratch) / "cache", ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            seconds, stdout = timed(compile_, env)
            assert json.loads(stdout)["cache"] == "miss"
            cold.append(seconds)
            shutil.rmtree(out)
            seconds, stdout = timed(compile_, env)
            assert json.loads(stdout)["cache"] == "hit"
            hit.append(seconds)
            seconds, _ = timed([*QSPEC, "compile", args.spec, "-o", str(out), "--check"], env)
            check.append(seconds)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    rows = {"cold build": cold, "cache hit (restore)": hit, "--check (up to date)": check}
    cold_median = statistics.median(cold)
    lines = [
        "# Build cache benchmark",
        "",
        f"Command: `.venv/bin/python bench/cache_minilm.py --spec {Path(args.spec).name} "
        f"--repeat {args.repeat}`",
        "",
        f"Spec: `{os.path.relpath(args.spec, ROOT)}`; build folder {size / 1e6:.1f} MB. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU flags: {flag_summary()}.",
        "",
        "| run | median wall s | ratio to cold |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.median(times):.2f} | "
            f"{statistics.median(times) / cold_median:.3f} |"
            for name, times in rows.items()
        ),
        "",
        f"Target: a hit under {TARGET}x a cold build: "
        f"{'met' if statistics.median(hit) / cold_median < TARGET else 'NOT met'}.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
