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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from qspec.compiler.errors import UserError
from qspec.compiler.inputs import ENTRY_PREFIX
from qspec.compiler.plain import plain_layer
from qspec.dsl import ir
from qspec.dsl.diagnostics import did_you_mean
from qspec.dsl.files import numpy_load_error, regular_file_problem

Batch = dict[str, torch.Tensor]
BATCH_ROWS = 32  # rows per batch when slicing array files
DEFAULT_SAMPLES = 128
DEFAULT_HOLDOUT = 16
DEFAULT_VERIFY = 128  # rows of a verify source
MAX_BATCHES = 100_000  # a calibration entry may be an endless generator


@dataclass
class LoadedModel:
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
    # (source, batches) in `holdout` order: each calibration source's held-out rows, then
    # each verify source's
    groups: tuple[tuple[str, int], ...] = ()

    @property
    def samples(self) -> int:
        return sum(_rows(b) for b in self.batches)


def resolve_path(word: ir.Word, text: str | None = None) -> Path:
    """A path written in a spec, relative to the file it is written in."""
    base = Path(word.span.file).parent if word.span.line else Path.cwd()
    return base / (text if text is not None else word.text)


# ---- model ---------------------------------------------------------------------------------


def load_model(source: ir.ModelSource) -> LoadedModel:
    torch.manual_seed(0)
    if source.kind == "python":
        result = call_entry(source.path, "model entry")
        module, example = _check_model_result(result, source.path)
    elif source.kind == "exported":
        module, example = _load_exported(source.path)
    else:
        module, example = _load_hf(source.path)
    if not isinstance(module, torch.fx.GraphModule):  # an unlifted exported program is eval
        module.eval()
    names = tuple(example)
    return LoadedModel(module, example, names, _weights_digest(module))


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
    if isinstance(inputs, torch.Tensor | np.ndarray):
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
    named = {
        name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        for name, value in named.items()
    }
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"example input '{name}' is a {type(value).__name__}, not a tensor", word.span
            )
    return named


# Members of a .pt2 that torch.export.load would run as code: pickled Python objects,
# TorchScript objects and compiled AOTInductor libraries.
_CODE_MEMBERS = ("data/constants/opaque_obj_", "data/constants/custom_obj_", "data/aotinductor/")


def _load_exported(word: ir.Word) -> tuple[torch.nn.Module, Batch]:
    """A Python model entry is code and runs; a .pt2 is data and must never run code. Members
    torch would execute are refused up front, and every pickle in the archive is read with
    weights_only=True (tensors and containers only): torch.export.load itself falls back to a
    full unpickle, which would run whatever the archive holds."""
    import pickle
    import zipfile

    path = _existing(word, "exported program")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as error:
        raise UserError(
            f"cannot load exported program: not a .pt2 archive ({error})",
            word.span,
            help="save it with torch.export.save(program, 'model.pt2')",
        ) from None
    code = next((name for name in names if any(m in name for m in _CODE_MEMBERS)), None)
    if code is not None:
        raise UserError(
            f"the exported program holds {code}, which loading it would execute",
            word.span,
            help="qspec loads only graphs and tensors from a .pt2; use a Python model entry "
            "for a model with script objects or compiled code",
        )
    try:
        with _weights_only_loads():
            program = torch.export.load(path)
    except pickle.UnpicklingError:
        raise UserError(
            "the exported program holds pickled data that is not tensors: qspec does not "
            "unpickle objects from a .pt2 (it could run code)",
            word.span,
            help="export the model with tensor example inputs and weights only",
        ) from None
    except Exception as error:
        raise UserError(f"cannot load exported program: {error}", word.span) from None
    if program.example_inputs is None:
        raise UserError(
            "the exported program carries no example inputs",
            word.span,
            help="export it with torch.export.export(model, args) and save with torch.export.save",
        )
    args, kwargs = program.example_inputs
    names = [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind.name == "USER_INPUT"
    ]
    example = {**dict(zip(names, args, strict=False)), **kwargs}
    return _modularize(program.module()), example


_CALLS = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv1d.default: "conv1d",
    torch.ops.aten.conv2d.default: "conv2d",
    torch.ops.aten.embedding.default: "embedding",
}


def _modularize(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """An exported program calls aten.linear/conv/embedding on bare parameters; give each call
    back a real nn.Linear/Conv/Embedding module (under its parameter's owner name), so capture,
    the passes and the backends see the same layers as for a Python model."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        kind = _CALLS.get(node.target) if node.op == "call_function" else None
        weight = node.args[0 if kind == "embedding" else 1] if kind else None
        if kind is None or weight is None or getattr(weight, "op", None) != "get_attr":
            continue
        owner = weight.target.rpartition(".")[0]
        bias = node.args[2] if kind != "embedding" and len(node.args) > 2 else None
        graph_module.set_submodule(owner, _layer_module(kind, graph_module, node, bias))
        source = node.args[1] if kind == "embedding" else node.args[0]
        with graph.inserting_before(node):
            call = graph.call_module(owner, (source,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph._codegen = torch.fx.graph.CodeGen()  # plain named arguments, not the exporter's pytree
    graph.lint()
    return torch.fx.GraphModule(graph_module, graph)  # without the exporter's input hooks


def _layer_module(
    kind: str, graph_module: torch.fx.GraphModule, node: torch.fx.Node, bias: Any
) -> torch.nn.Module:
    """The nn module computing `node`, holding the very same parameters.

    `bias` is the call's bias argument, an fx Node or a constant; fx types node arguments as a
    wide union (`Argument`), so they are read as Any here and checked at run time.
    """
    args: tuple[Any, ...] = node.args
    weight = graph_module.get_parameter(args[0 if kind == "embedding" else 1].target)
    if kind == "embedding":
        layer = torch.nn.Embedding(*weight.shape)
        layer.weight = weight
        return layer
    has_bias = getattr(bias, "op", None) == "get_attr"
    parameter = graph_module.get_parameter(bias.target) if has_bias else None
    base = {"linear": torch.nn.Linear, "conv1d": torch.nn.Conv1d}.get(kind, torch.nn.Conv2d)
    return plain_layer(base, weight, parameter, args[3:7] if kind != "linear" else ())


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
        # reshape(-1): 0-dim tensors (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- calibration ---------------------------------------------------------------------------


def load_calibration(
    calibration: ir.Calibration | None,
    model: LoadedModel,
    model_word: ir.Word | None,
    verify: Sequence[ir.Verify] = (),
) -> CalibrationData:
    """Calibration batches (the first rows of each source, `samples` in all) and held-out
    batches (the last rows of each, `holdout` in all), so verification never sees a calibration
    sample; then the rows of each `verify` source, which calibration never sees at all."""
    if calibration is None:
        where = model_word.span if model_word else None
        raise UserError(
            "compiling needs calibration data",
            where,
            help='add: calibration "model.py:batches" samples 128',
        )
    # whole numbers: the parser reads samples and holdout as ints
    samples = int(calibration.samples.value) if calibration.samples else DEFAULT_SAMPLES
    holdout = int(calibration.holdout.value) if calibration.holdout else DEFAULT_HOLDOUT
    if holdout < 1 or samples < 1:
        which = calibration.holdout if holdout < 1 else calibration.samples
        raise UserError(
            f"{'holdout' if holdout < 1 else 'samples'} {which.value if which else 0}: "
            "at least 1 is needed",
            which.span if which else calibration.span,
            help="verification runs the artifact on the held-out rows: hold out at least one "
            "(the default is 16)",
        )
    weights = [float(s.weight.value) if s.weight else 1.0 for s in calibration.sources]
    head: list[Batch] = []
    held: list[HeldOut] = []
    for source, rows, rows_held in zip(
        calibration.sources, shares(samples, weights), shares(holdout, weights), strict=True
    ):
        calibrate, verified = _split(source.path, model, rows, rows_held)
        head += calibrate
        held.append(verified)
    for extra in verify:
        rows_held = int(extra.samples.value) if extra.samples else DEFAULT_VERIFY
        held.append(_split(extra.source, model, 0, rows_held)[1])
    batches = [batch for part in held for batch in part.batches]
    labels = [label for part in held for label in part.labels or ()]
    digest = hashlib.sha256()
    for batch in head + batches:
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(batch[name].contiguous().numpy().tobytes())
    return CalibrationData(
        head,
        batches,
        labels if all(part.labels for part in held) else None,
        digest.hexdigest(),
        tuple((part.source, len(part.batches)) for part in held),
    )


def shares(total: int, weights: Sequence[float]) -> list[int]:
    """`total` rows split in proportion to `weights` by largest remainder, at least one each
    (the spec checks that there are enough rows): the same split on every build."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in itertools.islice(itertools.cycle(by_remainder), max(0, total - sum(counts))):
        counts[i] += 1
    while sum(counts) > total:  # the floor of one row overshot: take from the largest
        counts[counts.index(max(counts))] -= 1
    return counts


@dataclass
class HeldOut:
    """One source's held-out batches and their labels, if it has them."""

    source: str
    batches: list[Batch]
    labels: list[torch.Tensor] | None


def _split(
    source: ir.Word, model: LoadedModel, samples: int, holdout: int
) -> tuple[list[Batch], HeldOut]:
    """The first `samples` rows of a source and, held out, its last `holdout` ones."""
    if source.text.endswith((".npz", ".safetensors")):
        items = _array_batches(source)
    else:
        items = _entry_batches(source)
    head: list[Batch] = []
    tail: deque[tuple[Batch, torch.Tensor | None]] = deque()
    seen = tail_rows = 0
    for index, (batch, labels) in enumerate(itertools.islice(items, MAX_BATCHES)):
        batch = _check_batch(batch, source, model, index)
        rows = _rows(batch)
        if not rows:
            continue
        cut = max(0, min(rows, samples - seen))
        if cut:
            head.append(rows_of(batch, 0, cut))
        if cut < rows:
            tail.append((rows_of(batch, cut, rows), None if labels is None else labels[cut:]))
            tail_rows += rows - cut
            while tail_rows - _rows(tail[0][0]) >= holdout:
                tail_rows -= _rows(tail.popleft()[0])
        seen += rows
    if seen < samples + holdout:
        asked = f"{samples} + {holdout} held out" if samples else f"{holdout} to verify on"
        raise UserError(
            f"'{source.text}' has {seen} samples; the spec asks for {asked}",
            source.span,
            help="lower samples or holdout, or provide more data",
        )
    held, held_labels = _last_rows(list(tail), holdout)
    held_output = _try_shapes(model, head + held, source, held[0])
    if held_labels:
        _check_label_range(held_output, held_labels, source)
    return head, HeldOut(source.text, held, held_labels)


def _try_shapes(model: LoadedModel, batches: list[Batch], word: ir.Word, keep: Batch) -> Any:
    """Run the float model once on each distinct batch shape, calibration and held-out (the
    tail batch is often smaller), so a shape it cannot take is reported here, at the
    calibration statement, rather than deep inside a pass or verification.

    A batch may differ from the example input in more than the batch size (token sequences of
    another length, images of another size for a fully convolutional model): such data is
    accepted when, and only when, the model really runs on every shape it will be given. A
    fixed-shape rule would refuse those legitimate sources; the model is the authority on
    what it takes, and a rank or dtype mismatch is refused before any run. Returns the
    model's output on the shape of `keep` (one of the batches)."""
    shapes: dict[tuple[tuple[str, tuple[int, ...]], ...], Batch] = {}
    for batch in batches:
        shapes.setdefault(_shape_key(batch), batch)
    kept = None
    for key, batch in shapes.items():
        output = _try_batch(model, batch, word)
        kept = output if key == _shape_key(keep) else kept
    return kept


def _shape_key(batch: Batch) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(value.shape)) for name, value in batch.items())


def _try_batch(model: LoadedModel, batch: Batch, word: ir.Word) -> Any:
    try:
        with torch.no_grad():
            return model.module(**batch)
    except Exception as error:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items())
        exported = isinstance(model.module, torch.fx.GraphModule)
        raise UserError(
            f"the model fails on a calibration batch ({shapes}): {type(error).__name__}: {error}",
            word.span,
            help="an exported program needs dynamic shapes for a batch size other than its "
            "example's: torch.export.export(..., dynamic_shapes=...)"
            if exported
            else "the model must take every batch the source gives, calibration and held-out "
            "(the last held-out batch can be smaller: choose samples and holdout to fit)",
        ) from None


def _entry_batches(word: ir.Word) -> Iterator[tuple[Any, None]]:
    """The calibration entry's batches; what its code raises while it yields them is the
    entry's error, located at the calibration statement."""
    batches = call_entry(word, "calibration entry")
    with _on_path(resolve_path(word, word.text.rpartition(":")[0]).parent):
        try:
            for batch in batches:
                yield batch, None
        except (UserError, GeneratorExit):
            raise
        except (SystemExit, Exception) as error:
            raise _failed(f"the calibration entry {word.text}", word, error) from error


def rows_of(batch: Batch, start: int, stop: int) -> Batch:
    return {name: tensor[start:stop] for name, tensor in batch.items()}


def _last_rows(
    tail: list[tuple[Batch, torch.Tensor | None]], count: int
) -> tuple[list[Batch], list[torch.Tensor] | None]:
    """The last `count` rows of the tail batches (cutting the first batch), with labels."""
    extra = sum(_rows(batch) for batch, _ in tail) - count
    if extra and tail:
        batch, first_labels = tail[0]
        tail[0] = (
            rows_of(batch, extra, _rows(batch)),
            None if first_labels is None else first_labels[extra:],
        )
    held = [batch for batch, _ in tail]
    labels = [label for _, label in tail if label is not None]
    return held, labels if labels and len(labels) == len(tail) else None


def _array_batches(word: ir.Word) -> Iterable[tuple[Batch, torch.Tensor | None]]:
    """Batches of BATCH_ROWS rows of an .npz/.safetensors file, every array checked first:
    a sample dimension, a numeric dtype, the same rows, finite values."""
    arrays = _read_arrays(word)
    for name, array in arrays.items():
        _check_array(word, name, array)
    labels = arrays.pop("labels", None)
    if labels is not None:
        labels = _check_labels(word, labels)
    if not arrays:
        raise UserError(
            f"'{word.text}' holds no input arrays",
            word.span,
            help="save one array per model input, named like its forward() parameter",
        )
    named = arrays if labels is None else arrays | {"labels": labels}
    rows = {len(a) for a in named.values()}
    if len(rows) != 1:
        lengths = ", ".join(f"'{k}' {len(v)}" for k, v in named.items())
        raise UserError(
            f"arrays in '{word.text}' have different lengths ({lengths})",
            word.span,
            help="each array's first dimension is the sample: all need the same number of rows",
        )
    count = rows.pop()
    for start in range(0, count, BATCH_ROWS):
        window = slice(start, start + BATCH_ROWS)
        yield {k: v[window] for k, v in arrays.items()}, None if labels is None else labels[window]


def _read_arrays(word: ir.Word) -> dict[str, torch.Tensor]:
    """The arrays of an .npz (never unpickled: object arrays are refused) or .safetensors
    file; a file that does not parse is the user's, located at the calibration statement."""
    path = _existing(word, "calibration file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors' own parser: any failure is the file's
            raise UserError(
                f"cannot read '{word.text}': {error}",
                word.span,
                help="write it with safetensors.torch.save_file({name: tensor, ...}, path)",
            ) from None
    arrays: dict[str, torch.Tensor] = {}
    name = ""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # an .npy array under an .npz name
            raise ValueError("not an .npz archive")
        with data:
            for name in data.files:
                array = data[name]
                if array.dtype.kind not in "biuf":
                    raise TypeError(f"array '{name}' has dtype {array.dtype}, not numbers")
                if not array.dtype.isnative:  # big-endian data: torch takes native order
                    array = array.astype(array.dtype.newbyteorder("="))
                arrays[name] = torch.from_numpy(array)
    except Exception as error:  # numpy's zip and .npy parsers: any failure is the file's
        what = f"array '{name}' of '{word.text}'" if name else f"'{word.text}'"
        raise UserError(
            f"cannot read {what}: {numpy_load_error(error)}",
            word.span,
            help="write it with numpy.savez(path, name=array) from numeric arrays (qspec never "
            "unpickles data files, so object arrays cannot be read)",
        ) from None
    return arrays


def _check_array(word: ir.Word, name: str, array: torch.Tensor) -> None:
    """An array of a calibration file: one row per sample, and finite, before any batch."""
    if array.dim() == 0:
        raise UserError(
            f"{word.text}: array '{name}' is a 0-d scalar",
            word.span,
            help="the first dimension of each array is the sample: save a [samples, ...] array",
        )
    bad = first_nonfinite(array)
    if bad:
        raise UserError(
            f"{word.text}: array '{name}' has {bad}",
            word.span,
            help="statistics, scales and GPTQ need finite data: clean or drop those rows",
        )


def _check_labels(word: ir.Word, labels: torch.Tensor) -> torch.Tensor:
    """Labels are one class index per sample: accuracy on anything else would be garbage
    reported as a number. Returned as int64 (torch has no min over uint16..uint64)."""
    help = "save labels as a 1-D integer array of class indices: labels=y.astype('int64')"
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise UserError(
            f"{word.text}: array 'labels' is {labels.dtype} of shape {list(labels.shape)}, "
            "not one class index per sample",
            word.span,
            help=help,
        )
    if labels.dtype == torch.bool:
        raise UserError(f"{word.text}: 'labels' holds booleans, not class indices", word.span)
    labels = labels.to(torch.int64)  # a uint64 beyond int64 turns negative: refused below
    if len(labels) and int(labels.min()) < 0:
        raise UserError(f"{word.text}: 'labels' holds negative values", word.span, help=help)
    return labels


def _check_label_range(output: Any, labels: list[torch.Tensor], word: ir.Word) -> None:
    """Every held-out label indexes a class of the model's first output (`output`: the
    model's on a held-out batch)."""
    from qspec.compiler.capture import primary_tensor  # capture imports this module

    classes = primary_tensor(output).shape[-1]
    top = max(int(batch_labels.max()) for batch_labels in labels if len(batch_labels))
    if top >= classes:
        raise UserError(
            f"{word.text}: label {top} is out of range: the model's first output has "
            f"{classes} classes",
            word.span,
            help="labels are class indices from 0 to the number of classes - 1",
        )


def first_nonfinite(tensor: torch.Tensor) -> str | None:
    """'NaN at [3, 0, 1]' (or inf, -inf) for the first non-finite element, None if all are
    finite (integer tensors always are)."""
    if not tensor.is_floating_point():
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    index = [int(i) for i in torch.nonzero(~finite)[0]]
    value = float(tensor[tuple(index)])
    kind = "NaN" if value != value else ("inf" if value > 0 else "-inf")
    return f"{kind} at {index}"


def _check_batch(batch: Any, word: ir.Word, model: LoadedModel, index: int) -> Batch:
    """Batch `index` of the source, named like the model's inputs and checked: the example's
    dtype and rank, one row count for all inputs, finite values."""
    if not isinstance(batch, torch.Tensor | np.ndarray | Mapping | tuple | list):
        raise UserError(
            f"calibration batch {index} is a {type(batch).__name__}",
            word.span,
            expected="a dict (or tuple) of tensors, one per model input",
        )
    named = name_inputs(model.module, batch, word)
    expected = set(model.input_names)
    if set(named) != expected:
        raise UserError(
            f"a calibration batch has inputs {sorted(named)}; the model takes {sorted(expected)}",
            word.span,
        )
    for name, tensor in named.items():
        example = model.example[name]
        if tensor.dtype != example.dtype or tensor.dim() != example.dim() or not tensor.dim():
            raise UserError(
                f"calibration input '{name}' is {tensor.dtype} with {tensor.dim()} dims; "
                f"the example input is {example.dtype} with {example.dim()} dims",
                word.span,
            )
        bad = first_nonfinite(tensor)
        if bad:
            raise UserError(
                f"calibration input '{name}' has {bad} in batch {index} of {word.text}",
                word.span,
                help="statistics, scales and GPTQ need finite data: clean or drop those rows",
            )
    rows = {name: len(tensor) for name, tensor in named.items()}
    if len(set(rows.values())) > 1:
        raise UserError(
            f"calibration batch {index} has inputs with different row counts {rows}",
            word.span,
            help="the first dimension of every input is the batch: give them the same size",
        )
    return named


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


# ---- Python entries ------------------------------------------------------------------------


def call_entry(word: ir.Word, what: str, *args: Any) -> Any:
    """Import `file.py` (relative to the spec) and call `function(*args)`; errors point at
    `word`."""
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
    with _on_path(resolve_path(word, file).parent):  # imports inside the entry find siblings
        try:
            return entry(*args)
        except UserError:
            raise
        except (SystemExit, Exception) as error:
            raise _failed(f"the {what} {word.text}", word, error) from error


def _import_file(path: Path, word: ir.Word) -> ModuleType:
    name = ENTRY_PREFIX + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        with _on_path(path.parent):
            spec.loader.exec_module(module)
    except (SystemExit, Exception) as error:
        raise _failed(f"importing {path.name}", word, error) from error
    sys.modules[name] = module
    return module


def _failed(what: str, word: ir.Word, error: BaseException) -> UserError:
    """User code that raised, or called sys.exit (whose code must not become qspec's)."""
    if isinstance(error, SystemExit):
        return UserError(f"{what} called sys.exit({error.code!r})", word.span)
    return UserError(f"{what} raised {type(error).__name__}: {error}", word.span)


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """The entry's folder first on sys.path while its code runs: sibling modules import."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with suppress(ValueError):  # the user's code may have taken it out itself
            sys.path.remove(str(folder))


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every torch.load inside the block reads tensors only, whatever weights_only its caller
    passes (torch's own switch for this, read at each call). torch's warnings with tracebacks
    about a damaged archive are silenced: the UserError says it in one line."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export.serde")]
    levels = [logger.level for logger in loggers]
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _existing(word: ir.Word, what: str, text: str | None = None) -> Path:
    """The regular file a spec word names: a FIFO or device would block or never end."""
    path = resolve_path(word, text)
    if not path.exists():
        raise UserError(
            f"{what} not found: {text or word.text}",
            word.span,
            help=f"looked for {path} (paths are relative to the spec file)",
        )
    problem = regular_file_problem(path)
    if problem:
        raise UserError(f"{what} {text or word.text}: {problem}", word.span)
    return path
