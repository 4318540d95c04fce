"""A quantized language model's decode step in one C call (lfm2vl/native/step.c says why and how).

`use_native_step(model)` (the loader and `quantize_model` call it) gives the language model its
`decode_step`; each decode step then fills step.c's table from the model's and the cache's own
tensors and runs it, or returns None to keep torch's layers, which it does for anything the C step
was not written for: gradients, a capture for the prefix cache, more than SMALL_ROWS rows, a device
other than the CPU, a compute dtype other than float32 or bfloat16 (bf16 models are computed in
float32 there: step.c), a layer that is not an int8 or int4 one the kernels read (a LoRA adapter,
say), or LFM2VL_NATIVE_STEP=0 (to compare the two; LFM2VL_NATIVE=0 turns every kernel off).
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from ..model.cache import CacheView
from ..model.cast import cast
from ..native import step as native_step
from .common import SMALL_ROWS
from .int4 import INT4_BLOCKS, Int4Linear, int4_block

F32 = torch.float32


def _cpu(t: torch.Tensor, *dtypes: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.dtype in dtypes and t.is_contiguous()


class _Tensors:
    """The tensors a table points at, kept alive with it: the model's own where step.c reads their
    dtype, else float32 copies (a bf16 model's norms, biases and scales: small)."""

    def __init__(self) -> None:
        self.keep: list[torch.Tensor] = []
        self.copied: list[torch.Tensor] = []  # the model's tensors behind the copies (_Watch checks their writes)

    def own(self, t: torch.Tensor) -> int:
        self.keep.append(t)
        return t.data_ptr()

    def f32(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if _cpu(t, F32):
            return self.own(t)
        self.copied.append(t)
        return self.own(t.detach().to("cpu", F32, copy=True).contiguous())


def _linear(layer: nn.Module, held: _Tensors) -> native_step.QLinear | None:
    """step.c's view of one quantized layer, or None for a layer it does not take."""
    from . import Int8Linear

    if type(layer) not in (Int8Linear, Int4Linear) or layer.in_features % 32:
        return None
    if type(layer) is Int8Linear:
        if not _cpu(layer.qweight, torch.int8):
            return None
        return native_step.QLinear(native_step.INT8, 0, layer.out_features, layer.in_features, 0,
                                   held.own(layer.qweight), held.f32(layer.scale), held.f32(layer.bias))
    block = int4_block()
    if block not in INT4_BLOCKS or not _cpu(layer.qweight, torch.uint8) or not _cpu(layer.scales_zeros, torch.bfloat16):
        return None
    return native_step.QLinear(native_step.INT4, 0, layer.out_features, layer.in_features, block,
                               held.own(layer.qweight), held.own(layer.scales_zeros), held.f32(layer.bias))


def _table(text: nn.Module, view: CacheView) -> tuple[native_step.Table | None, list[torch.Tensor]]:
    """step.c's table for text and the cache (None: a model or cache it does not take), and the
    model's tensors it holds float32 copies of."""
    cfg, cache = text.cfg, view.cache
    if (cfg.head_dim > native_step.MAX_HEAD_DIM or not 2 <= cfg.conv_L_cache <= native_step.MAX_CONV_K
            or cfg.num_attention_heads % cfg.num_key_value_heads):
        return None, []
    kv = [t for layer in cfg.attention_layers for t in (cache.kt[layer], cache.v[layer])]
    conv = [cache.conv[layer] for layer in cfg.conv_layers]
    state_dtype = conv[0].dtype if conv else F32
    if not all(_cpu(t, F32) for t in kv) or not all(_cpu(t, state_dtype) for t in conv) or state_dtype not in (
            F32, torch.bfloat16):
        return None, []
    held = _Tensors()
    layers = (native_step.Layer * len(text.layers))()
    for i, (layer, row) in enumerate(zip(text.layers, layers, strict=True)):
        mlp = layer.feed_forward
        linears = [mlp.w1, mlp.w3, mlp.w2]
        op = layer.self_attn if layer.is_attention else layer.conv
        linears += [op.q_proj, op.k_proj, op.v_proj, op.out_proj] if layer.is_attention else [op.in_proj, op.out_proj]
        tables = [_linear(m, held) for m in linears]
        if any(t is None for t in tables):
            return None, []
        row.attention = int(layer.is_attention)
        row.operator_norm, row.ffn_norm = held.f32(layer.operator_norm.weight), held.f32(layer.ffn_norm.weight)
        row.w1, row.w3, row.w2 = tables[:3]
        for j, t in enumerate(tables[3:]):
            row.op[j] = t
        if layer.is_attention:
            row.q_norm, row.k_norm = held.f32(op.q_layernorm.weight), held.f32(op.k_layernorm.weight)
            row.kt, row.v = cache.kt[i].data_ptr(), cache.v[i].data_ptr()  # the engine's: written in place
        else:
            row.conv_w, row.conv_b = held.f32(op.conv.weight), held.f32(op.conv.bias)  # (D, 1, K): (D, K) rows
            row.conv_state = cache.conv[i].data_ptr()
    model = native_step.Model(len(text.layers), cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                              cfg.head_dim, cfg.conv_L_cache, cache.max_len, cfg.norm_eps,
                              int(state_dtype == torch.bfloat16), held.f32(text.embedding_norm.weight),
                              held.f32(cache.cos), held.f32(cache.sin),
                              ctypes.cast(layers, ctypes.POINTER(native_step.Layer)))
    return native_step.Table(model, layers, held.keep), held.copied


def _version(t: torch.Tensor) -> int:
    """t's count of in-place writes (-1 for an inference tensor, which keeps none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class _Watch:
    """What a table depends on, taken when it is built and checked every step: every module of every
    layer (two levels down: the projections and norms) and where its tensors live, how often the
    ones the table holds copies of were written in place (a bf16 model's norms: a load_state_dict
    into place must renew them; the others it reads where they are), and the cache and where its
    tensors live. Any change (a cast or move, a weight written in place, a replaced layer or
    parameter, a grown cache) fails the check (a write through `.data`, which counts no versions,
    does not). The walk is done once: a step compares flat lists (0.13 ms for the 450M in a loop,
    0.42 in the engine, where walking the dicts each step took 0.54 and filling the table 1.6) of
    ids of objects the watch holds (so that no replacement can be given a freed one's id). The table
    holds the weights it points at (a move or cast drops it: TextModel._apply), not the cache's
    tensors, whose addresses are checked here every step."""

    def __init__(self, text: nn.Module, view: CacheView, copied: list[torch.Tensor]) -> None:
        self.dicts: list[dict] = [text.layers._modules]  # every dict whose entries the table read
        self.tensors = [text.embedding_norm.weight]
        for layer in text.layers._modules.values():
            self.dicts.append(layer._modules)
            for m in layer._modules.values():
                for s in (m, *m._modules.values()):
                    self.dicts += [s._modules, s._buffers, s._parameters]
                    self.tensors += [t for t in (*s._buffers.values(), *s._parameters.values()) if t is not None]
        self.copied = copied
        owners, entries = self._owners(text), self._entries()
        self.held = owners + entries  # so that no replacement made after one of them was freed can take its id
        self.owners, self.entries = list(map(id, owners)), list(map(id, entries))
        self.places, self.versions = self._places(), self._versions()
        self.cache = self._cache(view)

    @staticmethod
    def _owners(text: nn.Module) -> list[object]:
        # what is looked up from the model each step, and the layers' dicts replaced wholesale (not their entries)
        return [text.embedding_norm.weight, text.layers, text.layers._modules,
                *(layer._modules for layer in text.layers._modules.values())]

    def _entries(self) -> list[object]:
        return [v for d in self.dicts for v in d.values()]

    def _places(self) -> list[int]:
        return [t.data_ptr() for t in self.tensors]

    def _versions(self) -> list[int]:
        return [_version(t) for t in self.copied]

    @staticmethod
    def _cache(view: CacheView) -> list[int]:
        cache = view.cache
        out = [id(cache), cache.max_len, cache.cos.data_ptr(), cache.sin.data_ptr()]
        for states in (cache.kt, cache.v, cache.conv):
            out += [t.data_ptr() for t in states.values()]
        return out

    def holds(self, text: nn.Module, view: CacheView) -> bool:
        return (self._cache(view) == self.cache and list(map(id, self._owners(text))) == self.owners
                and list(map(id, self._entries())) == self.entries and self._places() == self.places
                and self._versions() == self.versions)


def native_decode(text: nn.Module, embeds: torch.Tensor, view: CacheView) -> torch.Tensor | None:
    """The decode step of `text` (the language model) for embeds (B, 1, D): the final hidden states
    (B, 1, D) with the cache written (the caller advances it), or None to take torch's layers."""
    b = embeds.shape[0]
    if (torch.is_grad_enabled() or view.t != 1 or view.capture is not None or b > SMALL_ROWS
            or embeds.dtype not in (F32, torch.bfloat16) or embeds.device.type != "cpu" or not native_step.available()
            or os.environ.get("LFM2VL_NATIVE_STEP", "1") == "0"):
        return None
    state = text.decode_state
    if state is None or not state[0].holds(text, view):
        table, copied = _table(text, view)
        state = text.decode_state = (_Watch(text, view, copied), table)
    table = state[1]  # this call's own (another thread may decode another cache beside it)
    if table is None:
        return None
    starts = [view.cache.host_lengths[r] for r in view.rows]
    hidden = native_step.decode_step(table, embeds.reshape(b, -1).float(), list(view.rows), starts)  # (B, D)
    return cast(hidden, embeds.dtype).view(b, 1, -1)


def use_native_step(model: nn.Module) -> None:
    """Let a quantized model's language model decode in one C call where it can (native_decode)."""
    model.language_model.decode_step = native_decode
