"""How qspec times a piece of code: the median over repeated calls after a warmup."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

WARMUP = 3  # first runs allocate buffers and pick kernels
MIN_RUNS, MAX_RUNS, BUDGET = 10, 200, 0.2  # repeat for ~BUDGET seconds within these counts


def median_seconds(call: Callable[[], object]) -> float:
    """The median over at least MIN_RUNS calls after a warmup: it shrugs off scheduler
    hiccups that a mean would average in."""
    for _ in range(WARMUP):
        call()
    times: list[float] = []
    while len(times) < MAX_RUNS and (len(times) < MIN_RUNS or sum(times) < BUDGET):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
