"""The torch custom operators a lowered module calls: `qspec::packed_linear`, `packed_conv` and
`packed_embedding`. Their torch implementation (the decode on index tensors, then the float op)
is the reference; `kernels.CONVERTERS` turns each into a TVM kernel when the exported program is
imported into Relax.

`meta` is `layout.Meta.ints()`; `conv` is [stride..., padding..., dilation..., kernel...] per
spatial dimension.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from qspec.backends.tvm.decode import weight_at
from qspec.backends.tvm.layout import Meta

Tensor = torch.Tensor


class TorchOps:
    """`decode.Ops` over torch index tensors."""

    def word(self, value: Tensor) -> Tensor:
        return value.to(torch.int64) & 0xFFFFFFFF

    def int64(self, value: Any) -> Any:
        return value.to(torch.int64) if isinstance(value, Tensor) else value

    def float32(self, value: Tensor) -> Tensor:
        return value.to(torch.float32)

    def bits_to_float32(self, value: Tensor) -> Tensor:
        return value.to(torch.int32).view(torch.float32)

    def where(self, condition: Tensor, a: Tensor, b: float) -> Tensor:
        return torch.where(condition, a, b)

    def equal(self, a: Tensor, b: Tensor) -> Tensor:
        return a == b


def decoded(tensors: dict[str, Tensor | None], meta: Meta, rows: Tensor | None = None) -> Tensor:
    """The float32 weight [rows, cols] (or only the given rows)."""
    rows = torch.arange(meta.rows) if rows is None else rows
    cols = torch.arange(meta.cols)
    return weight_at(TorchOps(), tensors, meta, rows[..., None], cols)


def _tensors(codes, scales, zeros, table, index) -> dict[str, Tensor | None]:
    return {"codes": codes, "scales": scales, "zeros": zeros, "table": table, "index": index}


@torch.library.custom_op("qspec::packed_linear", mutates_args=())
def packed_linear(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    table: Tensor | None,
    index: Tensor | None,
    bias: Tensor | None,
    meta: list[int],
) -> Tensor:
    """y = x Wᵀ + b with W decoded from its stored form."""
    weight = decoded(_tensors(codes, scales, zeros, table, index), Meta.of(meta))
    return F.linear(x, weight, bias)


@packed_linear.register_fake
def _(x, codes, scales, zeros, table, index, bias, meta):
    return x.new_empty((*x.shape[:-1], meta[0]))


@torch.library.custom_op("qspec::packed_conv", mutates_args=())
def packed_conv(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    table: Tensor | None,
    index: Tensor | None,
    bias: Tensor | None,
    meta: list[int],
    conv: list[int],
) -> Tensor:
    """A 1-D or 2-D convolution (groups 1) whose weight matrix [out, (kernel..., in)] is stored."""
    layout = Meta.of(meta)
    stride, padding, dilation, kernel = _conv_options(conv)
    matrix = decoded(_tensors(codes, scales, zeros, table, index), layout)
    weight = matrix.reshape(layout.rows, *kernel, -1).movedim(-1, 1)
    convolve = F.conv1d if len(kernel) == 1 else F.conv2d
    return convolve(x, weight, bias, stride, padding, dilation)


@packed_conv.register_fake
def _(x, codes, scales, zeros, table, index, bias, meta, conv):
    stride, padding, dilation, kernel = _conv_options(conv)
    sizes = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, s, p, d, k in zip(x.shape[2:], stride, padding, dilation, kernel, strict=True)
    ]
    return x.new_empty((x.shape[0], meta[0], *sizes))


def _conv_options(conv: list[int]) -> list[list[int]]:
    """[stride, padding, dilation, kernel], each one number per spatial dimension."""
    dims = len(conv) // 4
    return [conv[i * dims : (i + 1) * dims] for i in range(4)]


@torch.library.custom_op("qspec::packed_embedding", mutates_args=())
def packed_embedding(
    ids: Tensor,
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    table: Tensor | None,
    index: Tensor | None,
    meta: list[int],
) -> Tensor:
    """Rows of a stored embedding table: only the rows looked up are decoded."""
    return decoded(_tensors(codes, scales, zeros, table, index), Meta.of(meta), ids)


@packed_embedding.register_fake
def _(ids, codes, scales, zeros, table, index, meta):
    return ids.new_empty((*ids.shape, meta[1]), dtype=torch.float32)
