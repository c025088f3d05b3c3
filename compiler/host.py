"""The build machine's CPU, as generated code and cache keys depend on it: TVM's llvm target
compiles for its vector extensions, the ONNX backend picks int8 kernels by VNNI, and measured
latencies belong to its model. Read from /proc/cpuinfo (empty elsewhere); stdlib only, so the
build cache can ask without importing torch."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

VNNI = ("avx512_vnni", "avx_vnni")


@functools.cache
def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _field(*names: str) -> str:
    return next((line.split(":", 1)[1] for line in _cpuinfo() if line.startswith(names)), "")


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (x86 `flags`, ARM `Features`)."""
    return frozenset(_field("flags", "Features").split())


def cpu_name() -> str:
    return _field("model name").strip() or platform.processor() or platform.machine()


def has_vnni() -> bool:
    """u8 x s8 dot products in int32 (VNNI): ONNX Runtime's u8s8 kernels are exact only here."""
    return not cpu_flags().isdisjoint(VNNI)
