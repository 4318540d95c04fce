"""What the int8 and int4 layers share: the kind of rows a call multiplies, their constructor from a
float weight, and the many-row matmul of a weight widened a block of rows at a time."""

from __future__ import annotations

import torch
from torch import nn

from ..model.linear import linear

SMALL_ROWS = 8  # decode rows at or below: the few-row kernels; above: widen and multiply (crossover ~8-16)
WIDEN_BLOCK_BYTES = 4 * 2**20  # many-row calls widen this much of a weight at a time (see widened_linear)


def prompt_rows(x: torch.Tensor) -> bool:
    """Whether x holds prompt or image rows (a (B, T > 1, in) chunk, or 2-D rows: the vision tower),
    not one new token per sequence (a decode step, (B, 1, in)). The choice is by kind of row, never
    by how many: prompt rows always take a prompt path (int8 x int8, or widened where int8 products
    are inexact, or on AMX for a long chunk: `int8_prompt_products`); decode rows never do, however
    many decode together. A one-token prompt chunk (a prefix hit one short) counts as a decode step."""
    return x.dim() == 2 or x.shape[-2] > 1


def kernel_rows(x: torch.Tensor) -> bool:
    """Whether x (on the CPU) may take the kernels (lfm2vl's, gemm.c, torch's int8 and int4 ones):
    none carries a gradient, so an input that needs one (an adapter trained below a frozen quantized
    layer) takes the widened weight instead."""
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


def widened_linear(x2: torch.Tensor, out_features: int, widen, bias: torch.Tensor | None = None,
                   act: str = "none") -> torch.Tensor:
    """act(x2 (M, in) @ W^T + bias) -> (M, out) for many rows, with W widened to x2's dtype a block of
    output rows at a time: `widen(i, j)` gives rows [i, j) of W as (j - i, in), scales applied.
    Widening the whole weight at once held a full widened copy beside the activations (33 MB in
    bf16 for the 1.6B's 2,048 x 8,192 layers); a block (WIDEN_BLOCK_BYTES, whole 64-row groups)
    stays in cache, and measured 8-28% faster (docs/performance.md). Each block's bias and
    activation are applied in its matmul's epilogue (model/linear.py); the products are the same
    bits row by row."""
    m, k = x2.shape
    rows = max(64, WIDEN_BLOCK_BYTES // (k * x2.element_size()) // 64 * 64)
    if rows >= out_features:
        return linear(x2, widen(0, out_features), bias, act)
    y = x2.new_empty(m, out_features)
    for i in range(0, out_features, rows):
        j = min(i + rows, out_features)
        y[:, i:j] = linear(x2, widen(i, j), None if bias is None else bias[i:j], act)  # (M, j - i)
    return y


class _QuantizedLinear(nn.Module):
    KIND = ""
    FUSES_ACTIVATION = True  # forward(x, act): model/linear.py's `apply` hands it the activation

    @staticmethod
    def quantized(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The buffers (by name) holding `weight` (out, in) quantized as this class does."""
        raise NotImplementedError

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> _QuantizedLinear:
        """A layer holding `weight` (out, in) quantized as this class does, and `bias`."""
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, dtype, weight.device)
        for name, t in cls.quantized(weight.detach(), dtype).items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer
