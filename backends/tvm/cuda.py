"""CUDA libraries whose kernels are compiled by nvcc at build time, so the artifact loads on a
GPU machine without NVRTC or a compiler.

TVM embeds a fatbin only when its CUDA runtime library is loaded during `tvm.compile`, and that
library links against the driver (libcuda.so.1). On a build machine without a driver the
compile runs in a subprocess that first loads `driver_stub.c` (compiled for each compile, with
the C compiler nvcc needs anyway) in the driver's place. Without nvcc the library carries CUDA
source, which the TVM runtime compiles when it loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qspec.compiler.errors import CompileFailure

if TYPE_CHECKING:  # export imports this module
    from qspec.backends.tvm.export import Compiled

STUB_SOURCE = Path(__file__).with_name("driver_stub.c")


def compile_library(program, target: dict, folder: Path) -> tuple[Compiled, str]:
    """`export.compile_program` for a CUDA target, and what device code the library holds."""
    import torch

    from qspec.backends.tvm.export import Compiled, compile_program

    if shutil.which("nvcc") is None:
        return compile_program(program, target, folder), "CUDA source, compiled when loaded"
    env = dict(os.environ, TVM_CUDA_COMPILE_MODE="nvcc")
    with tempfile.TemporaryDirectory() as scratch:
        if ctypes.util.find_library("cuda") is None:
            env["QSPEC_CUDA_DRIVER_STUB"] = str(_driver_stub(Path(scratch)))
        saved = Path(scratch) / "program.pt2"
        torch.export.save(program, saved)
        command = [sys.executable, "-m", __name__, str(saved), json.dumps(target), str(folder)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise CompileFailure(f"CUDA compile failed: {lines[-1]}")
    return Compiled(*json.loads(done.stdout.strip().splitlines()[-1])), "fatbin (nvcc)"


def _driver_stub(scratch: Path) -> Path:
    """The stand-in driver, compiled afresh into this compile's private scratch folder: a
    library loaded into the compiler process is never one read back from a shared cache
    folder, where anyone who can write it could plant code (and a compile of it is cheap)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise CompileFailure("compiling CUDA kernels without a GPU driver needs a C compiler")
    stub = scratch / "libcuda.so.1"
    command = [compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub)]
    done = subprocess.run([*command, str(STUB_SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise CompileFailure(f"compiling the CUDA driver stand-in failed: {lines[-1]}")
    return stub


def main(argv: list[str]) -> None:
    """The subprocess: PROGRAM TARGET_JSON FOLDER; prints what `compile_program` returns."""
    stub = os.environ.get("QSPEC_CUDA_DRIVER_STUB")
    if stub:  # before TVM loads its CUDA runtime library: nothing above imports tvm
        ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)
    import torch
    import tvm_ffi

    from qspec.backends.tvm import ops  # noqa: F401  (the custom operators the program calls)
    from qspec.backends.tvm.export import compile_program

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        sys.exit("TVM's CUDA runtime did not load: it would embed CUDA source, not a fatbin")
    program = torch.export.load(argv[0])
    print(json.dumps(compile_program(program, json.loads(argv[1]), Path(argv[2]))))


if __name__ == "__main__":
    main(sys.argv[1:])
