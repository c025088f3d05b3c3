"""Run a TVM artifact: the Relax VM over `model.so` and `params.bin`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qspec.compiler.errors import UserError


class TvmRunner:
    """A Relax VirtualMachine over `model.so` with the parameters of `params.bin`; called like
    OnnxRunner. The output names follow the ONNX artifact's: `output`, or `output_0`, ..."""

    def __init__(self, folder: Path, entry: dict, inputs: list[str], threads: int = 0):
        # TVM's thread pool reads this once, at its first parallel kernel; left unset it runs
        # on one core here (measured: 2x slower on 2 cores).
        os.environ.setdefault("TVM_NUM_THREADS", str(threads or os.cpu_count() or 1))
        import tvm
        from tvm import relax

        if entry["device"] == "cuda" and not tvm.cuda().exist:
            arch = entry["target"].get("arch", "")
            raise UserError(
                f"{entry['name']} in {folder} is compiled for CUDA {arch} and this machine has no "
                "GPU: run another target with --backend"
            )
        device = tvm.cuda() if entry["device"] == "cuda" else tvm.cpu()
        if Path(entry["file"]).suffix != ".so":  # TVM picks a loader by suffix; .tar/.o link
            raise UserError(f"{entry['name']} in {folder} names {entry['file']}, not a .so library")
        library = tvm.runtime.load_module(str(folder / entry["file"]))
        self.vm = relax.VirtualMachine(library, device)
        stored = tvm.runtime.load_param_dict_from_file(str(folder / entry["params"]))
        self.params = [stored[name].copyto(device) for name in entry["param_names"]]
        self.device, self.input_names = device, inputs
        self.output_names: list[str] | None = None

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise UserError(f"missing inputs {missing}; the model takes {self.input_names}")
        feed = [tvm.runtime.tensor(np.asarray(inputs[n]), self.device) for n in self.input_names]
        result = self.vm["main"](*feed, *self.params)
        outputs = [result] if hasattr(result, "numpy") else list(result)
        arrays = [output.numpy() for output in outputs]
        if self.output_names is None:
            count = len(arrays)
            self.output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
        return dict(zip(self.output_names, arrays, strict=True))

    def primary(self, batch: Mapping) -> np.ndarray:
        """The first output for a batch of torch tensors (used by verification)."""
        return next(iter(self({k: v.numpy() for k, v in batch.items()}).values()))
