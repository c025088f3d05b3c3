"""qspec: a declarative model compiler for low-bit ONNX Runtime and TVM artifacts."""

from importlib.metadata import PackageNotFoundError, version

from qspec.dsl.diagnostics import SpecError
from qspec.dsl.load import Checked, check_file, load_spec

try:
    __version__ = version("qspec")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["Checked", "SpecError", "__version__", "check_file", "load_spec"]
