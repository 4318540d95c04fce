"""A quantized language model's decode step in one C call (lfm2vl/native/step.c says why and how).

`use_native_step(model)` (the loader and `quantize_model` call it) gives the language model its
`decode_step`; each decode step then fills step.c's table from the model's and the cache's own
tensors and runs it, or returns None to keep torch's layers, which it does for anything the C step
was not written for: gradients, a capture for the prefix cache, a compute dtype or cache other than
float32 on the CPU, a layer that is not an int8 or int4 one the kernels read (a LoRA adapter, say),
or LFM2VL_NATIVE_STEP=0 (to compare the two; LFM2VL_NATIVE=0 turns every kernel off).
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from ..model.cache import CacheView
from ..native import step as native_step
from .common import SMALL_ROWS
from .int4 import INT4_BLOCKS, Int4Linear, int4_block

F32 = torch.float32


def _f32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == F32 and t.device.type == "cpu" and t.is_contiguous())


def _linear(layer: nn.Module, keep: list[torch.Tensor]) -> native_step.QLinear | None:
    """step.c's view of one quantized layer, or None for a layer it does not take."""
    from . import Int8Linear

    if not _f32(layer.bias) or layer.in_features % 32:
        return None
    bias = native_step.ptr(layer.bias)
    if type(layer) is Int8Linear and _f32(layer.scale) and layer.qweight.is_contiguous():
        keep += [layer.qweight, layer.scale]
        return native_step.QLinear(native_step.INT8, 0, layer.out_features, layer.in_features, 0,
                                   layer.qweight.data_ptr(), layer.scale.data_ptr(), bias)
    block = int4_block()
    if (type(layer) is Int4Linear and block in INT4_BLOCKS and layer.scales_zeros.dtype == torch.bfloat16
            and layer.qweight.is_contiguous() and layer.scales_zeros.is_contiguous()):
        keep += [layer.qweight, layer.scales_zeros]
        return native_step.QLinear(native_step.INT4, 0, layer.out_features, layer.in_features, block,
                                   layer.qweight.data_ptr(), layer.scales_zeros.data_ptr(), bias)
    return None


def _table(text: nn.Module, view: CacheView) -> native_step.Table | None:
    cfg, cache = text.cfg, view.cache
    if (cfg.head_dim > native_step.MAX_HEAD_DIM or cfg.conv_L_cache < 2
            or cfg.num_attention_heads % cfg.num_key_value_heads):
        return None
    keep: list[torch.Tensor] = []
    layers = (native_step.Layer * len(text.layers))()
    for i, (layer, row) in enumerate(zip(text.layers, layers, strict=True)):
        norms = [layer.operator_norm.weight, layer.ffn_norm.weight]
        mlp = layer.feed_forward
        linears = [mlp.w1, mlp.w3, mlp.w2]
        if layer.is_attention:
            attn = layer.self_attn
            linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj]
            norms += [attn.q_layernorm.weight, attn.k_layernorm.weight]
            states = [cache.kt[i], cache.v[i]]
        else:
            conv = layer.conv
            linears += [conv.in_proj, conv.out_proj]
            norms += [conv.conv.weight, conv.conv.bias]
            states = [cache.conv[i]]
        if not all(_f32(t) for t in norms + states):
            return None
        tables = [_linear(m, keep) for m in linears]
        if any(t is None for t in tables):
            return None
        keep += [t for t in norms + states if t is not None]
        row.attention = int(layer.is_attention)
        row.operator_norm, row.ffn_norm = norms[0].data_ptr(), norms[1].data_ptr()
        row.w1, row.w3, row.w2 = tables[:3]
        for j, t in enumerate(tables[3:]):
            row.op[j] = t
        if layer.is_attention:
            row.q_norm, row.k_norm = norms[2].data_ptr(), norms[3].data_ptr()
            row.kt, row.v = states[0].data_ptr(), states[1].data_ptr()
        else:
            row.conv_w, row.conv_b = norms[2].data_ptr(), native_step.ptr(norms[3])  # (D, 1, K): (D, K) rows
            row.conv_state = states[0].data_ptr()
    final = text.embedding_norm.weight
    if not all(_f32(t) for t in (final, cache.cos, cache.sin)):
        return None
    keep += [final, cache.cos, cache.sin]
    model = native_step.Model(len(text.layers), cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                              cfg.head_dim, cfg.conv_L_cache, cache.max_len, cfg.norm_eps, 0, final.data_ptr(),
                              cache.cos.data_ptr(), cache.sin.data_ptr(),
                              ctypes.cast(layers, ctypes.POINTER(native_step.Layer)))
    return native_step.Table(model, layers, keep)


def native_decode(text: nn.Module, embeds: torch.Tensor, view: CacheView) -> torch.Tensor | None:
    """The decode step of `text` (the language model) for embeds (B, 1, D): the final hidden states
    (B, 1, D) with the cache written (the caller advances it), or None to take torch's layers."""
    b = embeds.shape[0]
    if (torch.is_grad_enabled() or view.t != 1 or view.capture is not None or b > SMALL_ROWS
            or embeds.dtype != F32 or embeds.device.type != "cpu" or not native_step.available()
            or os.environ.get("LFM2VL_NATIVE_STEP", "1") == "0"):
        return None
    table = _table(text, view)
    if table is None:
        return None
    starts = [view.cache.host_lengths[r] for r in view.rows]
    return native_step.decode_step(table, embeds.reshape(b, -1), list(view.rows), starts).view(b, 1, -1)


def use_native_step(model: nn.Module) -> None:
    """Let a quantized model's language model decode in one C call where it can (native_decode)."""
    model.language_model.decode_step = native_decode
