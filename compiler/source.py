"""Load what a spec points at: the model (Python entry, .pt2, Hugging Face folder) and the
calibration data (Python entry or .npz/.safetensors), with errors located in the spec.

Paths are relative to the file the statement is written in. Loading runs user code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import itertools
import os
import sys
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from qspec.compiler.errors import UserError
from qspec.dsl import ir
from qspec.dsl.diagnostics import did_you_mean

Batch = dict[str, torch.Tensor]
BATCH_ROWS = 32  # rows per batch when slicing array files
DEFAULT_SAMPLES = 128
DEFAULT_HOLDOUT = 16
MAX_BATCHES = 100_000  # a calibration entry may be an endless generator


@dataclass
class ModelSource:
    """A float model ready to capture: the module, named example inputs, and its digest."""

    module: torch.nn.Module
    example: Batch
    input_names: tuple[str, ...]
    sha256: str


@dataclass
class CalibrationData:
    """Batches for calibration and, after them, held-out batches for verification."""

    batches: list[Batch]
    holdout: list[Batch]
    holdout_labels: list[torch.Tensor] | None
    sha256: str

    @property
    def samples(self) -> int:
        return sum(_rows(b) for b in self.batches)


def resolve_path(word: ir.Word, text: str | None = None) -> Path:
    """A path written in a spec, relative to the file it is written in."""
    base = Path(word.span.file).parent if word.span.line else Path.cwd()
    return base / (text if text is not None else word.text)


# ---- model ---------------------------------------------------------------------------------


def load_model(source: ir.ModelSource) -> ModelSource:
    torch.manual_seed(0)
    if source.kind == "python":
        result = call_entry(source.path, "model entry")
        module, example = _check_model_result(result, source.path)
    elif source.kind == "exported":
        module, example = _load_exported(source.path)
    else:
        module, example = _load_hf(source.path)
    module.eval()
    names = tuple(example)
    return ModelSource(module, example, names, _weights_digest(module))


def _check_model_result(result: Any, word: ir.Word) -> tuple[torch.nn.Module, Batch]:
    expected = "(module, example inputs): a torch.nn.Module and a tuple or dict of tensors"
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UserError(
            f"the model entry returned {type(result).__name__}", word.span, expected=expected
        )
    module, inputs = result
    if not isinstance(module, torch.nn.Module):
        raise UserError(
            f"the model entry returned {type(module).__name__} instead of a module",
            word.span,
            expected=expected,
        )
    return module, name_inputs(module, inputs, word)


def name_inputs(module: torch.nn.Module, inputs: Any, word: ir.Word) -> Batch:
    """Example inputs as a dict keyed by the forward() parameter names."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        named = dict(inputs)
    elif isinstance(inputs, tuple | list):
        parameters = list(inspect.signature(module.forward).parameters)
        if len(parameters) < len(inputs):
            raise UserError(
                f"{len(inputs)} example inputs for a forward() with {len(parameters)} parameters",
                word.span,
            )
        named = dict(zip(parameters, inputs, strict=False))
    else:
        raise UserError(
            f"example inputs are a {type(inputs).__name__}",
            word.span,
            expected="a tuple or dict of tensors",
        )
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"example input '{name}' is a {type(value).__name__}, not a tensor", word.span
            )
    return named


def _load_exported(word: ir.Word) -> tuple[torch.nn.Module, Batch]:
    path = _existing(word, "exported program")
    try:
        program = torch.export.load(path)
    except Exception as error:
        raise UserError(f"cannot load exported program: {error}", word.span) from None
    if program.example_inputs is None:
        raise UserError(
            "the exported program carries no example inputs",
            word.span,
            help="export it with torch.export.export(model, args) and save with torch.export.save",
        )
    args, kwargs = program.example_inputs
    signature = [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind.name == "USER_INPUT"
    ]
    example = {**dict(zip(signature, args, strict=False)), **kwargs}
    return program.module(), example


def _load_hf(word: ir.Word) -> tuple[torch.nn.Module, Batch]:
    folder = resolve_path(word)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"'{word.text}' is not a Hugging Face model folder",
            word.span,
            expected="a folder with config.json and the weights",
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    module = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:
        raise UserError(
            "the Hugging Face folder has no tokenizer to make example inputs",
            word.span,
            help='wrap the model in a Python entry: model "model.py:load"',
        ) from None
    encoded = tokenizer(["qspec compiles models.", "A second example sentence."], padding=True)
    example = {k: torch.tensor(v) for k, v in encoded.items()}
    return module, example


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- calibration ---------------------------------------------------------------------------


def load_calibration(
    calibration: ir.Calibration | None, model: ModelSource, model_word: ir.Word | None
) -> CalibrationData:
    """Calibration batches (the first `samples` rows of the source) and held-out batches (its
    last `holdout` rows), so verification never sees a calibration sample."""
    if calibration is None:
        where = model_word.span if model_word else None
        raise UserError(
            "compiling needs calibration data",
            where,
            help='add: calibration "model.py:batches" samples 128',
        )
    samples = calibration.samples.value if calibration.samples else DEFAULT_SAMPLES
    holdout = calibration.holdout.value if calibration.holdout else DEFAULT_HOLDOUT
    source = calibration.source
    if source.text.endswith((".npz", ".safetensors")):
        items = _array_batches(source)
    else:
        items = ((batch, None) for batch in call_entry(source, "calibration entry"))
    head: list[Batch] = []
    tail: deque[tuple[Batch, torch.Tensor | None]] = deque()
    seen = tail_rows = 0
    for batch, labels in itertools.islice(items, MAX_BATCHES):
        batch = _check_batch(batch, source, model)
        rows = _rows(batch)
        cut = max(0, min(rows, samples - seen))
        if cut:
            head.append(_rows_of(batch, 0, cut))
        if cut < rows:
            tail.append((_rows_of(batch, cut, rows), None if labels is None else labels[cut:]))
            tail_rows += rows - cut
            while tail_rows - _rows(tail[0][0]) >= holdout:
                tail_rows -= _rows(tail.popleft()[0])
        seen += rows
    if seen < samples + holdout:
        raise UserError(
            f"the calibration source has {seen} samples; the spec asks for "
            f"{samples} + {holdout} held out",
            source.span,
            help="lower samples or holdout, or provide more data",
        )
    held, labels = _last_rows(list(tail), holdout)
    digest = hashlib.sha256()
    for batch in head + held:
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(batch[name].contiguous().numpy().tobytes())
    return CalibrationData(head, held, labels, digest.hexdigest())


def _rows_of(batch: Batch, start: int, stop: int) -> Batch:
    return {name: tensor[start:stop] for name, tensor in batch.items()}


def _last_rows(tail: list[tuple[Batch, torch.Tensor | None]], count: int):
    """The last `count` rows of the tail batches (cutting the first batch), with labels."""
    extra = sum(_rows(batch) for batch, _ in tail) - count
    if extra and tail:
        batch, labels = tail[0]
        tail[0] = (_rows_of(batch, extra, _rows(batch)), None if labels is None else labels[extra:])
    held = [batch for batch, _ in tail]
    labels = [label for _, label in tail]
    return held, labels if labels and all(label is not None for label in labels) else None


def _array_batches(word: ir.Word) -> Iterable[tuple[Batch, torch.Tensor | None]]:
    path = _existing(word, "calibration file")
    if path.suffix == ".npz":
        with np.load(path) as data:
            arrays = {k: torch.from_numpy(data[k]) for k in data.files}
    else:
        from safetensors.torch import load_file

        arrays = load_file(str(path))
    labels = arrays.pop("labels", None)
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1:
        raise UserError(f"arrays in '{word.text}' have different lengths", word.span)
    count = rows.pop()
    for start in range(0, count, BATCH_ROWS):
        window = slice(start, start + BATCH_ROWS)
        yield {k: v[window] for k, v in arrays.items()}, None if labels is None else labels[window]


def _check_batch(batch: Any, word: ir.Word, model: ModelSource) -> Batch:
    named = name_inputs(model.module, batch, word)
    expected = set(model.input_names)
    if set(named) != expected:
        raise UserError(
            f"a calibration batch has inputs {sorted(named)}; the model takes {sorted(expected)}",
            word.span,
        )
    for name, tensor in named.items():
        example = model.example[name]
        if tensor.dtype != example.dtype or tensor.dim() != example.dim():
            raise UserError(
                f"calibration input '{name}' is {tensor.dtype} with {tensor.dim()} dims; "
                f"the example input is {example.dtype} with {example.dim()} dims",
                word.span,
            )
    return named


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


# ---- Python entries ------------------------------------------------------------------------


def call_entry(word: ir.Word, what: str) -> Any:
    """Import `file.py` (relative to the spec) and call `function()`; errors point at `word`."""
    file, _, function = word.text.rpartition(":")
    module = _import_file(_existing(word, "Python file", file), word)
    entry = getattr(module, function, None)
    if entry is None or not callable(entry):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(
            f"{file} has no function '{function}'",
            word.span,
            help=did_you_mean(function, names) or f"define {function}() in {file}",
        )
    try:
        return entry()
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"the {what} {word.text} raised {type(error).__name__}: {error}", word.span
        ) from error


def _import_file(path: Path, word: ir.Word) -> ModuleType:
    name = "qspec_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise UserError(
            f"importing {path.name} raised {type(error).__name__}: {error}", word.span
        ) from error
    finally:
        sys.path.remove(str(path.parent))
    sys.modules[name] = module
    return module


def _existing(word: ir.Word, what: str, text: str | None = None) -> Path:
    path = resolve_path(word, text)
    if not path.is_file():
        raise UserError(
            f"{what} not found: {text or word.text}",
            word.span,
            help=f"looked for {path} (paths are relative to the spec file)",
        )
    return path
