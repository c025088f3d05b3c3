"""End-to-end scores of compressed combinations without running the passes again.

Each layer's compressed weight (from sensitivity) is stitched into one working copy of the float
model, as EvoPress does with its database of compressed layers. The copy is then compared with
the float model on calibration rows (cosine, or the KL divergence of softmax outputs) or scored
by the spec's `evaluate` entry (`score(model) -> float`, higher is better).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from qspec.compiler.capture import float_matrix, primary_tensor
from qspec.compiler.source import call_entry, rows_of
from qspec.compiler.state import State, assign_weight


class Stitched:
    def __init__(self, state: State):
        self.graph = state.graph
        self.working = copy.deepcopy(state.graph.module).eval()
        self.batches = state.calibration.batches
        self.evaluate = state.spec.evaluate
        self.samples = state.calibration.samples
        self._reference: list[torch.Tensor] | None = None

    def put(self, name: str, weight: np.ndarray) -> None:
        assign_weight(self.working.get_submodule(name), self.graph.layers[name], weight)

    def reset(self, name: str) -> None:
        """Back to the float weight."""
        original = self.graph.module.get_submodule(name)
        self.put(name, float_matrix(self.graph.layers[name], original))

    def score(self) -> float:
        """The spec's evaluate entry on the stitched model."""
        assert self.evaluate is not None
        return float(call_entry(self.evaluate.entry, "evaluate entry", self.working))

    def agreement(self, measure: str, samples: int) -> float:
        return float(self.per_sample(measure, samples).mean())

    def per_sample(self, measure: str, samples: int) -> np.ndarray:
        """Per-sample cosine with the float model's output on the first `samples` calibration
        rows, or (measure 'kl') minus the KL(float || stitched) of their softmax outputs."""
        values, seen = [], 0
        with torch.no_grad():
            for batch, expected in zip(self.batches, self.reference(), strict=True):
                rows = min(len(expected), samples - seen)
                if rows <= 0:
                    break
                output = primary_tensor(self.working(**rows_of(batch, 0, rows))).float()
                values.append(_agreement(measure, expected[:rows], output))
                seen += rows
        return np.concatenate(values)

    def reference(self) -> list[torch.Tensor]:
        if self._reference is None:
            with torch.no_grad():
                self._reference = [
                    primary_tensor(self.graph.module(**b)).float() for b in self.batches
                ]
        return self._reference


def _agreement(measure: str, expected: torch.Tensor, output: torch.Tensor) -> np.ndarray:
    if measure == "kl":
        log_p = torch.log_softmax(expected.double(), dim=-1)
        log_q = torch.log_softmax(output.double(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return -kl.reshape(len(expected), -1).mean(1).numpy()
    a = expected.reshape(len(expected), -1).double()
    b = output.reshape(len(output), -1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()
