"""TVM kernels for the packed custom operators: TE computes whose weight is the `decode` stage,
a [cols, rows] expression over the stored tensors that the schedule computes per output tile
inside the kernel, so no full-precision copy of the weight ever exists in memory.

`CONVERTERS` is the `custom_convert_map` given to the Relax importer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import relax, te, tirx

from qspec.backends.tvm.decode import weight_at
from qspec.backends.tvm.layout import Meta

STORED = ("codes", "scales", "zeros", "table", "index")
ROW_TILE = 4  # rows of a register block in the CPU schedule


class TEOps:
    """`decode.Ops` over TE expressions."""

    def word(self, value: Any) -> Any:
        return value.astype("int64") & tirx.const(0xFFFFFFFF, "int64")

    def int64(self, value: Any) -> Any:
        return value if isinstance(value, int) else value.astype("int64")

    def float32(self, value: Any) -> Any:
        return value.astype("float32")

    def bits_to_float32(self, value: Any) -> Any:
        return tirx.reinterpret("float32", value.astype("int32"))

    def where(self, condition: Any, a: Any, b: float) -> Any:
        return tirx.Select(condition, a, tirx.const(b, "float32"))

    def equal(self, a: Any, b: Any) -> Any:
        return tirx.EQ(a, b)


def decode_stage(tensors: dict[str, te.Tensor], meta: Meta) -> te.Tensor:
    """W laid out [cols, rows]: the reduction runs down it, output columns are contiguous."""
    ops = TEOps()
    return te.compute(
        (meta.cols, meta.rows),
        lambda col, row: weight_at(ops, tensors, meta, row, col),
        name="decode",
    )


def linear(x: te.Tensor, tensors: dict[str, te.Tensor], meta: Meta) -> te.Tensor:
    """x [rows, cols] -> [rows, out]. The multiply-accumulate runs over the rows padded to a
    multiple of ROW_TILE, so the schedule can block rows in registers whatever the (symbolic)
    row count. Padding rows repeat the last row (a clamped index, hoisted out of the reduction;
    a zero-guard would branch on every multiply-add) and are never stored."""
    rows = x.shape[0]
    padded = (rows + ROW_TILE - 1) // ROW_TILE * ROW_TILE
    weight = decode_stage(tensors, meta)
    k = te.reduce_axis((0, meta.cols), name="k")
    accumulated = te.compute(
        (padded, meta.rows),
        lambda m, n: te.sum(x[tirx.min(m, rows - 1), k] * weight[k, n], axis=k),
        name="matmul",
    )
    y = te.compute((rows, meta.rows), lambda m, n: accumulated[m, n], name="rows")
    return _add_bias(y, tensors.get("bias"), axis=-1)


def conv(x: te.Tensor, tensors: dict[str, te.Tensor], meta: Meta, options: list[int]) -> te.Tensor:
    """Convolution as a matmul over (kernel position, input channel): out[b, *p, o] =
    Σ_r x[b, c(r), p·s - pad + kpos(r)·d] W[r, o], padding read as zero, then channels first."""
    dims = len(options) // 4
    stride, padding, dilation, kernel = (options[i * dims : (i + 1) * dims] for i in range(4))
    batch, channels, *sizes = x.shape
    outputs = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, s, p, d, k in zip(sizes, stride, padding, dilation, kernel, strict=True)
    ]
    weight = decode_stage(tensors, meta)
    r = te.reduce_axis((0, meta.cols), name="k")

    def patch(b, *where):
        *position, _ = where
        flat, channel = r // channels, r % channels
        offsets, inside, index = [], [], []
        for dim in reversed(range(dims)):
            offsets.insert(0, flat % kernel[dim])
            flat = flat // kernel[dim]
        for dim in range(dims):
            at = position[dim] * stride[dim] - padding[dim] + offsets[dim] * dilation[dim]
            inside.append(tirx.all(at >= 0, at < sizes[dim]))
            index.append(at)
        value = tirx.if_then_else(tirx.all(*inside), x[(b, channel, *index)], 0.0)
        return te.sum(value * weight[r, where[-1]], axis=r)

    y = te.compute((batch, *outputs, meta.rows), patch, name="matmul")
    first = te.compute(
        (batch, meta.rows, *outputs), lambda b, o, *p: y[(b, *p, o)], name="channels_first"
    )
    return _add_bias(first, tensors.get("bias"), axis=1)


def embedding(ids: te.Tensor, tensors: dict[str, te.Tensor], meta: Meta) -> te.Tensor:
    """Only the looked-up rows are decoded."""
    ops = TEOps()
    return te.compute(
        (*ids.shape, meta.cols),
        lambda *i: weight_at(ops, tensors, meta, ids[i[:-1]], i[-1]),
        name="gather_decode",
    )


def _add_bias(y: te.Tensor, bias: te.Tensor | None, axis: int) -> te.Tensor:
    if bias is None:
        return y
    return te.compute(y.shape, lambda *i: y[i] + bias[i[axis]], name="bias_add")


def _converter(kernel: Callable, name: str, optional_bias: bool, extra: int) -> Callable:
    """A Relax importer hook: the node's tensors become TE placeholders of one `emit_te`."""

    def convert(node, importer) -> relax.Var:
        args = importer.retrieve_args(node)
        data, stored = args[0], dict(zip(STORED, args[1:6], strict=True))
        if optional_bias:
            stored["bias"] = args[6]
        meta, options = Meta.of(args[-1 - extra]), args[-extra:] if extra else []
        present = {key: value for key, value in stored.items() if value is not None}

        def compute(data: te.Tensor, *tensors: te.Tensor) -> te.Tensor:
            return kernel(data, dict(zip(present, tensors, strict=True)), meta, *options)

        bb = importer.block_builder
        if kernel is not linear:
            return bb.emit_te(compute, data, *present.values(), primfunc_name_hint=name)
        # One row axis: a symbolic batch x sequence would cost a division per multiply-add.
        shape = list(data.ty.shape)
        rows = bb.emit(relax.op.reshape(data, [-1, meta.cols]))
        out = bb.emit_te(compute, rows, *present.values(), primfunc_name_hint=name)
        return bb.emit(relax.op.reshape(out, [*shape[:-1], meta.rows]))

    return convert


CONVERTERS = {
    "packed_linear.default": _converter(linear, "packed_linear", True, 0),
    "packed_conv.default": _converter(conv, "packed_conv", True, 1),
    "packed_embedding.default": _converter(embedding, "packed_embedding", False, 0),
}
