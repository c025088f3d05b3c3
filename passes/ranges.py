"""The range a static activation is quantized on, chosen from its calibration histogram.

- minmax: the smallest and largest value seen. Exact, and hostage to one outlier.
- percentile P: the values below which P% (and above which P%) of the samples fall.
- mse: [f·min, f·max] for the shrink factor f that minimizes the mean squared quantization
  error of the histogram's values (clipped ones included).
- entropy: the same family of ranges, minimizing the KL divergence between the histogram
  clipped to the range and that histogram quantized to the grid (TensorRT's calibration:
  outliers folded into the end bins, each grid level's mass spread over its non-empty bins).
"""

from __future__ import annotations

import numpy as np

from qspec.compiler.histogram import Histogram

LEVELS = 256
SHRINK = np.linspace(1.0, 0.05, 96)  # candidate factors f, largest first (ties keep the widest)


def activation_range(
    method: str, percentile: float | None, low: float, high: float, histogram: Histogram | None
) -> tuple[float, float]:
    """[low, high] to quantize on, from the observed extremes and the histogram."""
    if method == "minmax" or histogram is None or not histogram.counts.any() or low >= high:
        return low, high
    if method == "percentile":
        assert percentile is not None
        return _percentile(histogram, percentile, low, high)
    score = _squared_error if method == "mse" else _divergence
    centers, counts = histogram.centers, histogram.counts
    candidates = [(f * min(low, 0.0), f * max(high, 0.0)) for f in SHRINK]
    candidates = [c for c in candidates if _bins_inside(histogram, *c) >= LEVELS] or candidates[:1]
    scores = [score(centers, counts, lo, hi) for lo, hi in candidates]
    return candidates[int(np.argmin(scores))]


def _percentile(histogram: Histogram, percentile: float, low: float, high: float) -> tuple:
    cumulative = np.cumsum(histogram.counts) / histogram.counts.sum()
    edges = histogram.edges
    tail = 1 - percentile / 100
    bottom = edges[int(np.searchsorted(cumulative, tail, side="right"))]
    top = edges[int(np.searchsorted(cumulative, 1 - tail, side="left")) + 1]
    return max(low, float(bottom)), min(high, float(top))


def _bins_inside(histogram: Histogram, low: float, high: float) -> int:
    return int((high - low) / (2 * histogram.limit) * len(histogram.counts))


def _grid(low: float, high: float) -> tuple[float, float]:
    """The asymmetric grid on [low, high] (widened to hold 0): scale and zero point."""
    scale = (high - low) / (LEVELS - 1)
    return scale, float(np.round(-low / scale))


def _squared_error(centers: np.ndarray, counts: np.ndarray, low: float, high: float) -> float:
    scale, zero = _grid(low, high)
    codes = np.clip(np.round(centers / scale) + zero, 0, LEVELS - 1)
    return float((counts * (centers - (codes - zero) * scale) ** 2).sum())


def _divergence(centers: np.ndarray, counts: np.ndarray, low: float, high: float) -> float:
    """KL(P || Q): P the histogram on [low, high] with the clipped mass in its end bins, Q the
    in-range histogram quantized to the grid (without that mass: clipping is what it costs).
    The bin holding 0 is left out of both: the zero point represents 0 exactly on every grid,
    and after a ReLU that bin holds half the mass, whose spreading would favour narrow ranges."""
    inside = (centers >= low) & (centers <= high)
    half = (centers[1] - centers[0]) / 2
    inside[np.searchsorted(centers - half, 0.0, side="right") - 1] = False  # [lo, hi) holds 0
    kept = counts[inside]
    p = kept.copy()
    p[0] += counts[centers < low].sum()
    p[-1] += counts[centers > high].sum()
    scale, zero = _grid(low, high)
    level = np.clip(np.round(centers[inside] / scale) + zero, 0, LEVELS - 1).astype(int)
    mass = np.bincount(level, weights=kept, minlength=LEVELS)
    occupied = np.bincount(level, weights=(kept > 0).astype(float), minlength=LEVELS)
    q = np.where(kept > 0, mass[level] / np.maximum(occupied[level], 1), 0.0)
    p, q = p / p.sum(), q / max(q.sum(), 1e-300)
    present = p > 0
    q = np.maximum(q[present], 1e-12)  # clipped mass landing on an empty bin: a large penalty
    return float((p[present] * np.log(p[present] / q)).sum())
