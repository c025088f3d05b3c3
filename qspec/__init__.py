"""qspec: a declarative model compiler for low-bit ONNX Runtime and TVM artifacts.

build = qspec.compile("examples/minilm/int4.qspec", "build/int4")
model = qspec.load("build/int4")
outputs = model({"input_ids": ids, "attention_mask": mask})
"""

from importlib.metadata import PackageNotFoundError, version

from qspec.dsl.diagnostics import SpecError
from qspec.dsl.load import Checked, check_file, load_spec

try:
    __version__ = version("qspec")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


def compile(spec, out_dir, **options):
    """Compile a spec into a verified build folder; returns a `Build`. See `qspec compile`."""
    from qspec.driver import compile_spec

    return compile_spec(spec, out_dir, **options)


def sweep(spec, budget, out_dir, log=lambda _: None):
    """Compile a spec at several values of one budget (`"weight bits=3..6 step 0.5"`); returns
    one row per point. See `qspec sweep`."""
    from qspec.pareto import sweep_spec

    return sweep_spec(spec, budget, out_dir, log)


def load(folder, backend=None):
    """A callable over named numpy arrays for the artifact in a build folder."""
    from qspec.runtime import load as load_build

    return load_build(folder, backend)


__all__ = [
    "Checked",
    "SpecError",
    "__version__",
    "check_file",
    "compile",
    "load",
    "load_spec",
    "sweep",
]
