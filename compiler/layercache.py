"""Per-layer results cached by content, so a build whose spec changed in one place recomputes
only what the change reaches: calibration statistics, compressed layers, candidates' costs.

A key is the sha256 of everything that decides the result (`LayerCache.key`): the inputs the
caller names (a layer's float tensors, its resolved plan, the statistics it consumes), and
always `environment()` (this cache format, the source of qspec's stages, the numeric libraries'
versions) and the model and calibration data (`context`). Tensors count by dtype, shape and
bytes; a repr only where it is all there is (a module's settings).

An entry is `<kind>/<key[:2]>/<key>.safetensors` (the tensors, and the rest as JSON in its
header) beside `<key>.json` (the sha256 of that file). Nothing is unpickled: a hostile entry
can at worst be wrong numbers of the right shape, and any entry that is missing, short, corrupt
or does not match its sha256 is a miss, recomputed and written over. Writes land in a temporary
file renamed into place; a folder that cannot be written caches nothing and fails nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import struct
import tempfile
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import safetensors.numpy
import torch

from qspec.compiler.cache import (
    cache_dir,
    content_cache_enabled,
    package_version,
    source_digest,
)
from qspec.compiler.source import CalibrationData, LoadedModel

FORMAT = 1  # raise when what an entry holds, or how a key is formed, changes
STAGES = ("dsl", "compiler", "passes")  # the code that computes every cached result
LIBRARIES = ("qspec", "torch", "numpy", "scipy", "transformers")
BACKEND_LIBRARIES = ("onnx", "onnxruntime", "onnxscript", "onnx-ir", "apache-tvm")
T = TypeVar("T")


@dataclasses.dataclass
class Entry:
    """A cached result: JSON-able values and named arrays."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class LayerCache:
    """The entries of one compile. `reused` and `computed` list, per kind, the names looked up,
    for the build log and the tests."""

    def __init__(self, folder: Path, context: str):
        self.folder, self.context = folder, context
        self.reused: dict[str, list[str]] = defaultdict(list)
        self.computed: dict[str, list[str]] = defaultdict(list)

    def key(self, kind: str, *parts: object) -> str:
        return digest(FORMAT, environment(), self.context, kind, *parts)

    def load(self, kind: str, key: str, name: str, decode: Callable[[Entry], T]) -> T | None:
        """The entry `decode`d, or None (counted as computed) when there is no sound one: also
        when `decode` finds it malformed (raises KeyError, TypeError or ValueError)."""
        entry = _read(self._path(kind, key))
        try:
            value = None if entry is None else decode(entry)
        except (KeyError, TypeError, ValueError):
            value = None
        (self.reused if value is not None else self.computed)[kind].append(name)
        if value is not None:  # a use, for the cache's least-recently-used eviction
            with contextlib.suppress(OSError):
                os.utime(self._path(kind, key).with_suffix(".json"))
        return value

    def save(self, kind: str, key: str, entry: Entry) -> None:
        path = self._path(kind, key)
        tensors = {name: _c_order(array) for name, array in entry.arrays.items()}
        fortran = sorted(name for name, array in entry.arrays.items() if _is_fortran(array))
        header = {"meta": json.dumps(entry.meta), "fortran": json.dumps(fortran)}
        payload = safetensors.numpy.save(tensors, metadata=header)
        sha256 = hashlib.sha256(payload).hexdigest()
        record = {"format": FORMAT, "bytes": len(payload), "sha256": sha256}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, payload)
            _write_atomic(path.with_suffix(".json"), json.dumps(record).encode())
        except OSError:
            pass  # read-only or full: this build just does not cache

    def summary(self) -> list[str]:
        """One line per kind: how many results were reused, and which were computed."""
        lines = []
        for kind in sorted(self.reused.keys() | self.computed.keys()):
            reused, computed = self.reused[kind], self.computed[kind]
            line = f"cache {kind}: {len(reused)} reused, {len(computed)} computed"
            if reused and computed:
                line += f" ({', '.join(computed)})"
            lines.append(line)
        return lines

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / kind / key[:2] / f"{key}.safetensors"


def open_cache(model: LoadedModel, calibration: CalibrationData) -> LayerCache | None:
    """The cache of one compile's passes (None under `--no-cache`). The model counts by its
    weights' digest, its module tree and the source file of its class; the data by every
    calibration batch (the held-out ones are verification's)."""
    return _open(model.sha256, model.module, calibration.batches)


def open_module_cache(module: torch.nn.Module, data: object) -> LayerCache | None:
    """`open_cache` for a float module alone (its weights hashed here) and the data it runs."""
    return _open(digest(module.state_dict()), module, data)


def _open(weights: str, module: torch.nn.Module, data: object) -> LayerCache | None:
    if not content_cache_enabled():
        return None
    context = digest(weights, repr(module), _source_bytes(type(module)), data)
    return LayerCache(cache_dir() / "layers", context)


def module_digest(module: torch.nn.Module) -> str:
    """A module by content: every submodule's type and plain attributes (numbers, strings,
    dtypes, containers of them; other attributes count by type only), and every parameter and
    buffer."""
    return digest(_modules(module), module.state_dict())


def module_structure(module: torch.nn.Module) -> str:
    """`module_digest` with parameters and buffers by dtype and shape alone: modules that a
    tracer (which sees tensors as shapes) cannot tell apart."""
    tensors = {name: (str(t.dtype), tuple(t.shape)) for name, t in module.state_dict().items()}
    return digest(_modules(module), tensors)


def _modules(module: torch.nn.Module) -> list[tuple[str, str, str, object]]:
    return [
        (name, type(sub).__module__, type(sub).__qualname__, _plain(vars(sub)))
        for name, sub in module.named_modules()
    ]


def cost_model(costs: object) -> str:
    """A cost model's part of a key: its type and `backend_environment()`."""
    return digest(type(costs).__qualname__, backend_environment())


@cache
def backend_environment() -> str:
    """What makes a backend's entries stale: the code of qspec's backends and the versions of
    the libraries they emit with."""
    return digest(source_digest("backends"), [package_version(n) for n in BACKEND_LIBRARIES])


@cache
def environment() -> str:
    """What makes any entry stale besides its own inputs: the cache format, the code of the
    stages the passes run (a cost model's backend is a key's own part) and the libraries that
    compute."""
    return digest(FORMAT, source_digest(*STAGES), [package_version(name) for name in LIBRARIES])


def digest(*parts: object) -> str:
    """sha256 of values in a canonical, unambiguous encoding: numbers, strings, bytes, arrays
    and tensors (dtype, shape, bytes), dataclasses (type and compared fields), sequences and
    mappings of them. Anything else is a TypeError rather than a guess."""
    hasher = hashlib.sha256()
    _feed(hasher, parts)
    return hasher.hexdigest()


def _feed(hasher: hashlib._Hash, value: object) -> None:
    def tagged(tag: bytes, data: bytes | memoryview) -> None:
        hasher.update(tag + struct.pack("<Q", memoryview(data).nbytes))
        hasher.update(data)

    if value is None or isinstance(value, bool):
        tagged(b"c", repr(value).encode())
    elif isinstance(value, int):
        tagged(b"i", str(value).encode())
    elif isinstance(value, float):
        tagged(b"f", value.hex().encode())
    elif isinstance(value, str):
        tagged(b"s", value.encode())
    elif isinstance(value, bytes):
        tagged(b"b", value)
    elif isinstance(value, np.ndarray):
        tagged(b"a", f"{value.dtype.str}{value.shape}".encode())
        tagged(b"d", _bytes(np.ascontiguousarray(value)))
    elif isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        tagged(b"t", f"{value.dtype}{tuple(value.shape)}".encode())
        tagged(b"d", _bytes(flat.view(torch.uint8).numpy()))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        tagged(b"D", type(value).__qualname__.encode())
        for field in dataclasses.fields(value):
            if field.compare:
                tagged(b"n", field.name.encode())
                _feed(hasher, getattr(value, field.name))
    elif isinstance(value, list | tuple):
        tagged(b"l", str(len(value)).encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, dict):
        tagged(b"m", str(len(value)).encode())
        for name in sorted(value):
            _feed(hasher, name)
            _feed(hasher, value[name])
    else:
        raise TypeError(f"no canonical form for {type(value).__name__}")


def _bytes(array: np.ndarray) -> memoryview:
    """A contiguous array's bytes, not copied (0-d and empty arrays too)."""
    return memoryview(array.reshape(-1).view(np.uint8).data)


def _plain(value: object) -> object:
    """What `digest` takes of a module attribute (private ones, `_name`, are left out)."""
    if value is None or isinstance(value, bool | int | float | str | np.ndarray | torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype | np.dtype):
        return str(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if dataclasses.is_dataclass(value):  # such as the Layer a lowered module keeps
        fields = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return [type(value).__qualname__, fields]
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    return type(value).__qualname__


def _read(path: Path) -> Entry | None:
    try:
        record = json.loads(path.with_suffix(".json").read_bytes())
        payload = path.read_bytes()
    except (OSError, ValueError):
        return None
    if (
        not isinstance(record, dict)
        or record.get("format") != FORMAT
        or record.get("bytes") != len(payload)
        or record.get("sha256") != hashlib.sha256(payload).hexdigest()
    ):
        return None
    try:
        (size,) = struct.unpack("<Q", payload[:8])
        header = json.loads(payload[8 : 8 + size])["__metadata__"]
        meta, fortran = json.loads(header["meta"]), json.loads(header["fortran"])
        arrays = {k: np.array(v) for k, v in safetensors.numpy.load(payload).items()}
        for name in fortran:
            arrays[name] = arrays[name].T
    except Exception:  # whatever a damaged file raises, it is a miss
        return None
    return Entry(meta, arrays) if isinstance(meta, dict) else None


def _is_fortran(array: np.ndarray) -> bool:
    """Stored transposed and given back in the same layout: BLAS may round a product of a
    Fortran-ordered operand differently, and results must not depend on the cache."""
    return array.ndim == 2 and array.flags.f_contiguous and not array.flags.c_contiguous


def _c_order(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T if _is_fortran(array) else array)


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a part."""
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp", delete=False
    ) as file:
        try:
            file.write(data)
            file.close()
            os.replace(file.name, path)
        except OSError:
            os.unlink(file.name)
            raise


def _source_bytes(kind: type) -> bytes:
    """The source file that defines a model class ('' for built-ins and generated classes)."""
    try:
        return Path(inspect.getfile(kind)).read_bytes()
    except (OSError, TypeError):
        return b""
