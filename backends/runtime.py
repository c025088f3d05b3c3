"""Load a build folder and run it with the backend's own runtime: `qspec.load(folder)`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qspec.compiler.build import read_manifest
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
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise UserError(f"missing inputs {missing}; the model takes {self.input_names}")
        feed = {name: np.asarray(inputs[name]) for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, feed), strict=True))

    def primary(self, batch: Mapping) -> np.ndarray:
        """The first output for a batch of torch tensors (used by verification)."""
        outputs = self({k: v.numpy() for k, v in batch.items()})
        return outputs[self.output_names[0]]


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


Runner = OnnxRunner | TvmRunner


def cuda_available(backend: str) -> bool:
    """Whether this machine can run a CUDA artifact of the backend."""
    if backend == "tvm":
        import tvm

        return bool(tvm.cuda().exist)
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def open_target(folder: Path, entry: dict, inputs: list[str], threads: int = 0) -> Runner:
    """The runner of one entry of a manifest's `targets`."""
    if entry["backend"] == "tvm":
        return TvmRunner(folder, entry, inputs, threads)
    return OnnxRunner(folder / entry["file"], threads, device=entry.get("device", "cpu"))


def load(folder: str | Path, backend: str | None = None) -> Runner:
    """A callable over numpy arrays for the artifact in a build folder."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    targets = manifest["targets"]
    chosen = next((t for t in targets if backend in (None, t["backend"], t["name"])), None)
    if chosen is None:
        available = ", ".join(t["name"] for t in targets)
        raise UserError(f"the build has no {backend} artifact (it has: {available})")
    return open_target(folder, chosen, list(manifest["model"]["inputs"]))
