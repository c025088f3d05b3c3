"""torchvision's model definitions, without torchvision's C++ extension.

The torchvision wheel PyPI serves for torch 2.13 is a CUDA build: its `_C.so` needs
libc10_cuda, so `import torchvision` fails beside the CPU torch ("operator torchvision::nms
does not exist"), and transformers imports any torchvision it can find. `make install` unpacks
it into VENV/torchvision-models, off the import path; this loads the `torchvision` package from
there without running its `__init__` (which loads the extension), so `torchvision.models` and
its families import and build as published. Use it in a model entry run by a `qspec compile`
process of its own, never inside the test process (transformers there would find it).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from pathlib import Path

FOLDER = Path(sys.prefix) / "torchvision-models" / "torchvision"


def torchvision_models() -> types.ModuleType:
    if "torchvision" not in sys.modules:
        if not FOLDER.is_dir():
            raise ModuleNotFoundError(
                f"no torchvision in {FOLDER.parent} (make install puts it there)"
            )
        package = types.ModuleType("torchvision")
        package.__path__ = [str(FOLDER)]
        package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
        package.__spec__.submodule_search_locations = [str(FOLDER)]
        sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models")
