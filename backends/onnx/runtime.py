"""Run an ONNX artifact with ONNX Runtime."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qspec.compiler.errors import UserError


class OnnxRunner:
    """An ONNX Runtime session over an artifact; called with named numpy arrays."""

    def __init__(self, path: Path, threads: int = 0, device: str = "cpu"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.quiet = ort.RunOptions()
        self.quiet.log_severity_level = 4  # a failed run raises; its colored log line is noise
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # Fixed sizes per input (None where a dimension is free), checked before a run.
        self.input_shapes = {
            i.name: [size if isinstance(size, int) else None for size in i.shape]
            for i in self.session.get_inputs()
        }
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise UserError(f"missing inputs {missing}; the model takes {self.input_names}")
        feed = {name: np.asarray(inputs[name]) for name in self.input_names}
        outputs = self.session.run(None, feed, self.quiet)
        return dict(zip(self.output_names, outputs, strict=True))

    def primary(self, batch: Mapping) -> np.ndarray:
        """The first output for a batch of torch tensors (used by verification)."""
        outputs = self({k: v.numpy() for k, v in batch.items()})
        return outputs[self.output_names[0]]
