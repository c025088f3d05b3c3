"""A streaming histogram of a tensor's values, in bounded memory, for activation ranges.

BINS equal bins over [-limit, limit]. The first batch sets the limit to its largest magnitude;
a later value outside it doubles the limit, merging pairs of bins into the middle half, which
is exact: no count ever moves to a bin that does not hold its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

BINS = 4096  # a multiple of 4: doubling moves the old bins into the middle half


@dataclass
class Histogram:
    limit: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS))

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().float().reshape(-1)
        if values.numel() == 0:
            return
        peak = float(values.abs().max())
        if self.limit == 0.0:
            self.limit = peak if peak > 0 else 1.0
        while peak > self.limit:
            pairs = self.counts.reshape(-1, 2).sum(1)
            quarter = np.zeros(BINS // 4)
            self.counts = np.concatenate([quarter, pairs, quarter])
            self.limit *= 2
        added = torch.histc(values, bins=BINS, min=-self.limit, max=self.limit)
        self.counts = self.counts + added.double().numpy()

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, BINS + 1)

    @property
    def centers(self) -> np.ndarray:
        edges = self.edges
        return np.asarray((edges[:-1] + edges[1:]) / 2)
