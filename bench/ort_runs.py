"""What the ONNX Runtime benchmarks share: a quiet CPU session, a median latency, and the CPU
flags that decide which kernels run (recorded beside every latency)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qspec.compiler.host import cpu_flags

KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency(sess: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> float:
    """Median milliseconds of `runs` runs, after one warm-up."""
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def flag_summary() -> str:
    flags = cpu_flags()
    return ", ".join(f for f in KERNEL_FLAGS if f in flags) or "none of " + "/".join(KERNEL_FLAGS)
