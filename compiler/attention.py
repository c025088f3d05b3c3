"""Split nn.MultiheadAttention into layers qspec can compress, before anything is measured.

nn.MultiheadAttention keeps its query, key and value projections in one packed parameter
(`in_proj_weight`, [3E, E]) and calls `F.multi_head_attention_forward`, which reads that
parameter and `out_proj.weight` directly: no Linear module is ever called, so capture finds no
layer and a ViT's attention (a third of its weights) would stay float without a word. Each such
module is replaced by `SplitAttention`, which computes the same function with four nn.Linear
calls (`q_proj`, `k_proj`, `v_proj`, `out_proj`) and scaled dot-product attention, so rules can
name them like any other Linear ("encoder.layers.*.self_attention.q_proj").

Modules with extra learned key/value rows (`add_bias_kv`) or an appended zero row
(`add_zero_attn`) are left as they are and reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Packed:
    module: str
    reason: str


def split_attention(model: nn.Module) -> tuple[list[str], list[Packed]]:
    """Replace every nn.MultiheadAttention of `model` that can be split (in place); return the
    names of those replaced and, for the others, why not."""
    split, kept = [], []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention):
            continue
        reason = _why_not(module)
        if reason:
            kept.append(Packed(name, reason))
            continue
        model.set_submodule(name, SplitAttention(module))
        split.append(name)
    return split, kept


def _why_not(module: nn.MultiheadAttention) -> str | None:
    if module.bias_k is not None:
        return "it has learned key/value bias rows (add_bias_kv)"
    if module.add_zero_attn:
        return "it appends a zero key/value row (add_zero_attn)"
    return None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
    return layer


class SplitAttention(nn.Module):
    """nn.MultiheadAttention (same arguments, same results in eval mode) with separate q, k, v
    and output projections."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        self.q_proj, self.k_proj, self.v_proj = (
            _linear(w, b) for w, b in zip(weights, biases, strict=True)
        )
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.training = mha.training

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # [L, N, E] from here on, as in F.multi_head_attention_forward
        length, batch, _ = query.shape
        q, k, v = (
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(value)),
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [N, H, L, S]
        scores = scores + self._mask(attn_mask, key_padding_mask, is_causal, scores)
        weights = F.softmax(scores, dim=-1)
        out = (weights @ v).permute(2, 0, 1, 3).reshape(length, batch, -1)
        out = self.out_proj(out)
        if self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if not need_weights:
            return (out.squeeze(1) if unbatched else out), None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return (out.squeeze(1), weights.squeeze(0)) if unbatched else (out, weights)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[L, N, E] -> [N, H, L, E / H]."""
        length, batch, embed = x.shape
        return x.reshape(length, batch, self.num_heads, embed // self.num_heads).permute(1, 2, 0, 3)

    def _mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        scores: torch.Tensor,
    ) -> torch.Tensor:
        """The additive mask over [N, H, L, S]: True in a boolean mask means "may not attend"."""
        batch, heads, length, source = scores.shape
        mask = torch.zeros((), dtype=scores.dtype, device=scores.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            attn_mask = _additive(attn_mask, scores.dtype)
            if attn_mask.dim() == 3:  # [N * H, L, S]
                attn_mask = attn_mask.reshape(batch, heads, length, source)
            mask = mask + attn_mask
        if key_padding_mask is not None:
            mask = mask + _additive(key_padding_mask, scores.dtype).reshape(batch, 1, 1, source)
        return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)
