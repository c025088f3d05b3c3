"""Activation histograms and the ranges each calibration method chooses from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qspec.compiler.histogram import BINS, Histogram
from qspec.passes.ranges import activation_range

batches = st.lists(
    st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=50), min_size=1, max_size=6
)


@settings(max_examples=60, deadline=None)
@given(batches)
def test_a_growing_histogram_keeps_every_value_in_its_bin(values: list[list[float]]):
    """Doubling the range merges bin pairs exactly: the counts equal one histogram of all the
    values over the final range (bin edges shared, so only values on an edge may differ)."""
    histogram = Histogram()
    for batch in values:
        histogram.add(torch.tensor(batch))
    flat = np.concatenate([np.asarray(b, np.float32) for b in values])
    assert histogram.counts.sum() == len(flat)
    assert histogram.limit >= np.abs(flat).max()
    direct, _ = np.histogram(flat, bins=BINS, range=(-histogram.limit, histogram.limit))
    on_edges = np.isin(flat, histogram.edges).sum()
    assert np.abs(histogram.counts - direct).sum() <= 2 * on_edges


def _histogram(values: torch.Tensor) -> Histogram:
    histogram = Histogram()
    histogram.add(values)
    return histogram


def test_minmax_is_the_observed_range_and_percentile_cuts_the_tails():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[0] = 40.0  # one outlier
    low, high = float(x.min()), float(x.max())
    histogram = _histogram(x)
    assert activation_range("minmax", None, low, high, histogram) == (low, high)
    bottom, top = activation_range("percentile", 99.9, low, high, histogram)
    assert bottom == pytest.approx(-3.09, abs=0.1) and top == pytest.approx(3.09, abs=0.1)


def _quantization_error(x: torch.Tensor, low: float, high: float) -> float:
    scale = (high - low) / 255
    zero = round(-low / scale)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return float(((x - (codes - zero) * scale) ** 2).mean())


def test_mse_chooses_a_range_no_worse_than_minmax_on_the_data_itself():
    torch.manual_seed(1)
    x = torch.distributions.StudentT(3).sample((200_000,))
    low, high = float(x.min()), float(x.max())
    chosen = activation_range("mse", None, low, high, _histogram(x))
    assert chosen[1] - chosen[0] < high - low  # heavy tails: clipping pays
    assert _quantization_error(x, *chosen) < _quantization_error(x, low, high)


def test_entropy_clips_a_lone_outlier_but_keeps_the_bulk():
    torch.manual_seed(1)
    x = torch.relu(torch.randn(200_000))
    x[0] = 60.0
    bottom, top = activation_range("entropy", None, 0.0, 60.0, _histogram(x))
    assert bottom == 0.0 and 2.5 < top < 30.0


def test_a_constant_tensor_keeps_its_range():
    histogram = _histogram(torch.zeros(100))
    for method in ("percentile", "mse", "entropy"):
        assert activation_range(method, 99.0, 0.0, 0.0, histogram) == (0.0, 0.0)
