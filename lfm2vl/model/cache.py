"""HybridCache: the decoding state of LFM2's two layer kinds for a fixed number of independent slots.

- attention layers: K (after q/k-norm and RoPE) as (S, Hkv, Dh, max_len) and V as (S, Hkv, max_len, Dh),
  written in place by index (slot, position), so rows of one batch may sit at different lengths. K is
  stored transposed because a decode step multiplies the query by K^T: torch's bf16 CPU matmul copies
  a strided operand first, and from (max_len, Dh) rows that copy was a transpose of every layer's
  keys on every token, where from K^T it copies whole rows (int4 decode step 27-29 -> 23-25 ms on
  a 2-core EPYC, benchmarks/bench_decode.py, docs/performance.md);
- conv layers: the last K-1 values of the gated input B*x, (S, D, K-1) (mlx-lm's choice; the
  reference keeps K, of which only K-1 matter);
- each slot's length, on the device (for the writes and RoPE positions, no host sync) and on the
  host (for shapes: how many keys a step attends over);
- RoPE cos/sin tables for every position, computed once (grown with the cache).

K and V may be kept in a wider dtype than the compute dtype (`kv_dtype`; the model asks for float32
on the CPU, lfm2vl.py says why); they hold the compute dtype's values exactly, and a prefix is read
out in the compute dtype.

A step over some slots is a `CacheView` (`cache.view(rows, t)`): it carries the positions, the
attention mask and the write targets, all built without reading the device. A conv state cannot be
rewound, so prefix reuse copies KV rows plus a conv state captured at exactly the reused boundary
(`read_prefix` / `write_prefix`; docs/engine.md explains why vLLM and mlx-vlm got this wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import TextConfig
from .cast import cast


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(..., T) positions -> cos, sin of shape (..., T, Dh), in float32 then cast ("rotate-half" layout)."""
    freqs = positions[..., None].float() * rope_inv_freq(head_dim, theta, positions.device)  # (..., T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass(frozen=True)
class PrefixState:
    """KV rows [0, length) of one slot and its conv state at `length` (what a prefix cache stores)."""

    length: int
    k: dict[int, torch.Tensor]  # layer -> (Hkv, length, Dh)
    v: dict[int, torch.Tensor]
    conv: dict[int, torch.Tensor]  # layer -> (D, K-1), the state at exactly `length`


class HybridCache:
    def __init__(
        self,
        cfg: TextConfig,
        slots: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kv_dtype: torch.dtype | None = None,
    ):
        self.cfg, self.slots, self.device, self.dtype = cfg, slots, torch.device(device), dtype
        self.kv_dtype = kv_dtype or dtype
        self.max_len = 0
        self.kt: dict[int, torch.Tensor] = {}  # layer -> (S, Hkv, Dh, max_len)
        self.v: dict[int, torch.Tensor] = {}  # layer -> (S, Hkv, max_len, Dh)
        self.conv = {
            i: torch.zeros(slots, cfg.hidden_size, cfg.conv_L_cache - 1, device=device, dtype=dtype)
            for i in cfg.conv_layers
        }
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (S,)
        self.host_lengths = [0] * slots
        self._rows: dict[tuple[int, ...], tuple[torch.Tensor, slice | None]] = {}
        self.grow(max_len)

    # -- memory -----------------------------------------------------------------------------------
    def grow(self, max_len: int) -> None:
        """Make room for `max_len` positions per slot, keeping what is stored (no-op if already there)."""
        if max_len <= self.max_len:
            return
        c = self.cfg
        for i in c.attention_layers:
            kt = torch.zeros(self.slots, c.num_key_value_heads, c.head_dim, max_len, device=self.device, dtype=self.kv_dtype)
            v = torch.zeros(self.slots, c.num_key_value_heads, max_len, c.head_dim, device=self.device, dtype=self.kv_dtype)
            if i in self.kt:
                kt[..., : self.max_len] = self.kt[i]
                v[:, :, : self.max_len] = self.v[i]
            self.kt[i], self.v[i] = kt, v
        positions = torch.arange(max_len, device=self.device)
        self.cos, self.sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, self.dtype)  # (L, Dh)
        self.max_len = max_len

    def ensure_slots(self, slots: int, most: int) -> None:
        """Hold at least `slots` slots (doubling, at most `most`), keeping what the others store; a
        no-op if it already does. An engine starts with one and adds slots as requests run together,
        so one request at a time never holds K/V for eight (403 MB of float32 K/V for the 450M at
        2,048 positions)."""
        if slots <= self.slots:
            return
        extra = max(slots, min(most, 2 * self.slots)) - self.slots
        for states in (self.kt, self.v, self.conv):
            for i, t in states.items():
                states[i] = torch.cat([t, t.new_zeros(extra, *t.shape[1:])])
        self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(extra)])
        self.host_lengths += [0] * extra
        self.slots += extra

    # -- slots ------------------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        """Empty a slot (its KV rows need no clearing: positions past the length are never read)."""
        for state in self.conv.values():
            state[slot].zero_()
        self.lengths[slot] = 0
        self.host_lengths[slot] = 0

    def read_prefix(self, slot: int, length: int, conv: dict[int, torch.Tensor] | None = None) -> PrefixState:
        """Copy out KV rows [0, length) of `slot`; the conv state is the slot's current one unless given."""
        if length > self.host_lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.host_lengths[slot]} positions, not {length}")
        k = {i: t[slot, :, :, :length].transpose(-1, -2).to(self.dtype, copy=True, memory_format=torch.contiguous_format)
             for i, t in self.kt.items()}
        v = {i: t[slot, :, :length].to(self.dtype, copy=True) for i, t in self.v.items()}
        if conv is None:
            conv = self.conv_snapshot(slot)
        return PrefixState(length, k, v, conv)

    def conv_snapshot(self, slot: int) -> dict[int, torch.Tensor]:
        return {i: t[slot].clone() for i, t in self.conv.items()}

    def write_prefix(self, slot: int, state: PrefixState, length: int, conv: dict[int, torch.Tensor]) -> None:
        """Load KV rows [0, length) of `state` and the conv state captured at `length` into `slot`."""
        self.grow(length)
        for i, t in self.kt.items():
            t[slot, :, :, :length] = state.k[i][:, :length].transpose(-1, -2)
            self.v[i][slot, :, :length] = state.v[i][:, :length]
        for i, t in self.conv.items():
            t[slot].copy_(conv[i])
        self.lengths[slot] = length
        self.host_lengths[slot] = length

    # -- one forward step over some slots ---------------------------------------------------------
    def view(self, rows: Sequence[int], t: int, capture: int | None = None) -> CacheView:
        """The step that appends `t` tokens to each slot in `rows` (one batch row per slot, in order)."""
        rows = tuple(rows)
        starts = [self.host_lengths[r] for r in rows]
        kv_len = max(starts) + t
        if kv_len > self.max_len:
            raise ValueError(f"{kv_len} positions exceed the cache's max_len={self.max_len}; grow() it first")
        if rows not in self._rows:  # built once per active set: no host -> device copy every step
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            contiguous = rows == tuple(range(rows[0], rows[0] + len(rows)))
            self._rows[rows] = (index, slice(rows[0], rows[0] + len(rows)) if contiguous else None)
            if len(self._rows) > 4096:
                self._rows.clear()
        index, block = self._rows[rows]
        positions = self.lengths[block if block is not None else index][:, None] + torch.arange(
            t, device=self.device
        )  # (B, T)
        if all(s == 0 for s in starts):  # every row starts fresh: plain causal attention
            mask, is_causal = None, t > 1
        elif len(rows) == 1 and t == 1:  # one row, one query: it sees every stored key
            mask, is_causal = None, False
        else:
            k_pos = torch.arange(kv_len, device=self.device)
            mask, is_causal = (k_pos[None, None, :] <= positions[:, :, None])[:, None], False  # (B, 1, T, S)
        return CacheView(self, rows, index, block, t, kv_len, positions, mask, is_causal, capture)


@dataclass
class CacheView:
    cache: HybridCache
    rows: tuple[int, ...]
    index: torch.Tensor  # (B,) slot of each batch row
    block: slice | None  # the same rows as a slice, when contiguous (views instead of gathers)
    t: int
    kv_len: int  # keys attended over: the longest row's length after this step
    positions: torch.Tensor  # (B, T) RoPE positions of the new tokens
    attn_mask: torch.Tensor | None  # (B, 1, T, kv_len) True = attend
    is_causal: bool
    # Conv layers also keep their state after the first `capture` new tokens (1 <= capture <= T) in
    # `captured`: a boundary inside the chunk that a prefix cache can resume from.
    capture: int | None = None
    captured: dict[int, torch.Tensor] | None = None

    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, Dh) for the new positions, from the precomputed tables."""
        return self.cache.cos[self.positions][:, None], self.cache.sin[self.positions][:, None]

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, Dh) at each row's positions; returns K^T (B, Hkv, Dh, kv_len) and
        V (B, Hkv, kv_len, Dh) with the past, as strided views of the cache where the rows allow."""
        kt, vc = self.cache.kt[layer], self.cache.v[layer]
        rows = self.index[:, None]  # (B, 1) broadcast against positions (B, T)
        # advanced indices at dims 0 and 3 (K^T) or 0 and 2 (V) put (B, T) first: values are (B, T, Hkv, Dh)
        kt[rows, :, :, self.positions] = cast(k.transpose(1, 2), kt.dtype)
        vc[rows, :, self.positions] = cast(v.transpose(1, 2), vc.dtype)
        if self.block is not None:
            return kt[self.block, ..., : self.kv_len], vc[self.block, :, : self.kv_len]
        return kt[..., : self.kv_len].index_select(0, self.index), vc[:, :, : self.kv_len].index_select(0, self.index)

    def conv_state(self, layer: int) -> torch.Tensor:
        """(B, D, K-1): the last K-1 values of B*x of each row."""
        state = self.cache.conv[layer]
        return state[self.block] if self.block is not None else state.index_select(0, self.index)

    def set_conv_state(self, layer: int, full: torch.Tensor) -> None:
        """full (B, D, K-1+T): [stored state | this step's B*x]; keeps the last K-1 (and any capture)."""
        keep = full.shape[-1] - self.t
        if self.capture is not None:
            if self.captured is None:
                self.captured = {}
            self.captured[layer] = full[:, :, self.capture : self.capture + keep].clone()
        new = full[:, :, -keep:]
        state = self.cache.conv[layer]
        if self.block is not None:
            state[self.block] = new
        else:
            state.index_copy_(0, self.index, new)

    def advance(self) -> None:
        """Called by the model once every layer has written this step."""
        target = self.block if self.block is not None else self.index
        self.cache.lengths[target] += self.t
        for r in self.rows:
            self.cache.host_lengths[r] += self.t
