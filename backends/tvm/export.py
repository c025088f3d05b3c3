"""Emit the TVM artifact: swap compressed layers for their packed modules, export with
torch.export (symbolic batch and sequence), import into Relax with the packed kernels, schedule,
compile for the spec's target and write `model.so` plus `params.bin` (every weight, packed ones
still packed) into the target's folder."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.export import Dim

from qspec.backends.lowering import lowered_module
from qspec.backends.tvm.cuda import compile_library
from qspec.backends.tvm.modules import lower
from qspec.backends.tvm.schedule import build_library
from qspec.compiler.capture import Graph
from qspec.compiler.errors import CompileFailure
from qspec.compiler.folder import sha256_file
from qspec.compiler.qmodel import CompressedLayer, QModel
from qspec.dsl import ir

LIBRARY, PARAMS = "model.so", "params.bin"
DEFAULT_ARCH = "sm_80"


@dataclass
class TvmArtifact:
    folder: Path
    device: str  # llvm | cuda
    target: dict  # the TVM target, as JSON
    params: list[str]  # parameter names, in the order `main` takes them after the inputs
    emitted: dict[str, str]  # layer -> what it became
    layer_bytes: dict[str, int]  # layer -> bytes of its stored tensors
    param_bytes: int  # bytes of every parameter tensor
    module: torch.nn.Module  # the lowered module that was exported (torch reference ops)
    kernels: list[str]  # kernels in the library
    device_code: str  # llvm, fatbin (nvcc), or CUDA source

    @property
    def files(self) -> list[Path]:
        return [self.folder / LIBRARY, self.folder / PARAMS]

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def entry(self, target: ir.Target, stage: Path) -> dict:
        library, params = (path.relative_to(stage).as_posix() for path in self.files)
        return {
            "device": self.device,
            "target": self.target,
            "file": library,
            "params": params,
            "bytes": self.total_bytes,
            "param_bytes": self.param_bytes,
            "sha256": {path: sha256_file(stage / path) for path in (library, params)},
            "param_names": self.params,
            "kernels": len(self.kernels),
            "device_code": self.device_code,
            "layers": {
                name: {"emitted": self.emitted[name], "bytes": self.layer_bytes[name]}
                for name in self.emitted
            },
        }

    def other_bytes(self) -> int:
        """Parameter bytes that belong to no compressed layer."""
        return self.param_bytes - sum(self.layer_bytes.values())


def tvm_target(target: ir.Target) -> dict:
    """The JSON form TVM 0.27 takes (it rejects "llvm -mcpu=..." strings)."""
    import tvm

    host = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    if target.device is not None and target.device.text == "cuda":
        arch = target.arch.text if target.arch else DEFAULT_ARCH
        return {"kind": "cuda", "arch": arch, "host": host}
    if target.mcpu is not None:
        host["mcpu"] = target.mcpu.text
    return {**host, "num-cores": os.cpu_count() or 1}


def emit(graph: Graph, qmodel: QModel, target: ir.Target, folder: Path) -> TvmArtifact:
    module, emitted = lowered_module(graph.module, qmodel, lower)
    spec = tvm_target(target)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # every axis symbolic, even those the model fixes: TVM 0.27 builds static-shape
        # kernels of a small CNN in a minute instead of seconds
        program = export_program(module, graph.example)
        if spec["kind"] == "cuda":
            compiled, device_code = compile_library(program, spec, folder)
        else:
            trials = int(target.tune_trials.value) if target.tune_trials else 0
            compiled, device_code = compile_program(program, spec, folder, trials), "llvm"
    except CompileFailure:
        raise
    except Exception as error:  # TVM raises many types; the message is what matters
        raise CompileFailure(f"TVM compile failed: {type(error).__name__}: {error}") from error
    return TvmArtifact(
        folder,
        "cuda" if spec["kind"] == "cuda" else "llvm",
        spec,
        compiled.params,
        emitted,
        _layer_bytes(module, qmodel),
        compiled.param_bytes,
        module,
        compiled.kernels,
        device_code,
    )


class Compiled(NamedTuple):
    """What `compile_program` wrote: kernel names, parameter names in the order `main` takes
    them after the inputs, and the bytes of those parameters."""

    kernels: list[str]
    params: list[str]
    param_bytes: int


def export_program(module: torch.nn.Module, example: dict[str, torch.Tensor]):
    """The torch.export program of a lowered module, every input dimension symbolic."""
    dynamic = {name: dict.fromkeys(range(t.dim()), Dim.AUTO) for name, t in example.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, (), kwargs=example, dynamic_shapes=dynamic, strict=False)


def compile_program(program, target: dict, folder: Path, trials: int = 0) -> Compiled:
    """Import into Relax with the packed kernels, compile (tuning with `trials` timings), write
    LIBRARY and PARAMS into `folder`."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from qspec.backends.tvm.kernels import CONVERTERS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        relax_module = from_exported_program(
            program,
            keep_params_as_input=True,
            unwrap_unit_return_tuple=True,
            custom_convert_map=CONVERTERS,
        )
    relax_module, params = relax.frontend.detach_params(relax_module)
    inputs = len(program.graph_signature.user_inputs)
    names = [var.name for var in relax_module["main"].params[inputs:]]
    with _native_notices_dropped():
        kernels = build_library(relax_module, target, folder / LIBRARY, trials)
    values = dict(zip(names, params.get("main", []), strict=True))
    tvm.runtime.save_param_dict_to_file(values, str(folder / PARAMS))
    return Compiled(kernels, names, sum(value.numpy().nbytes for value in values.values()))


HARMLESS = ("Fast mode segfaults when there are out-of-bounds indices",)


@contextmanager
def _native_notices_dropped() -> Iterator[None]:
    """TVM's C++ warns on stderr about every embedding lookup (`take` in fast mode: ids come
    from the tokenizer, in range); drop those lines, pass anything else through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not any(text in line for text in HARMLESS):
                    print(line, file=sys.stderr)


def _layer_bytes(module: torch.nn.Module, qmodel: QModel) -> dict[str, int]:
    return {name: _parameter_bytes(module.get_submodule(name)) for name in qmodel}


def stored_bytes(compressed: CompressedLayer, original: torch.nn.Module) -> int:
    """The bytes `_layer_bytes` will find for this layer, from its lowered module alone."""
    return _parameter_bytes(lower(compressed, original)[0])


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
