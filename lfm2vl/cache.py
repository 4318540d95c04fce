"""HybridCache: the decoding state of LFM2's two layer kinds, preallocated for one request batch.

- attention layers: K (after q/k-norm and RoPE) and V, (B, Hkv, max_len, Dh), written in place;
- conv layers: the last K-1 values of the gated input B*x, (B, D, K-1) (mlx-lm's choice; the
  reference keeps K, of which only K-1 matter);
- a (B, max_len) mask of real (non-padding) positions, from which RoPE positions are counted.

A conv state cannot be rewound, so prefix reuse and speculative rollback need `snapshot()` /
`restore()` (PEERS §3.1 C: vLLM, mlx-vlm and vmlx all shipped bugs here). Restoring is exact: the
KV rows past the snapshot's length are simply overwritten by the next writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TextConfig


@dataclass(frozen=True)
class Snapshot:
    length: int
    conv: dict[int, torch.Tensor]
    mask: torch.Tensor


class HybridCache:
    def __init__(
        self,
        cfg: TextConfig,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len, self.batch, self.length = max_len, batch, 0
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in cfg.attention_layers}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in cfg.attention_layers}
        conv_layers = [i for i, t in enumerate(cfg.layer_types) if t == "conv"]
        self.conv = {
            i: torch.zeros(batch, cfg.hidden_size, cfg.conv_L_cache - 1, device=device, dtype=dtype)
            for i in conv_layers
        }
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)

    # -- used by the model ----------------------------------------------------------------------
    def extend_mask(self, new: torch.Tensor | None, t: int | None = None) -> torch.Tensor:
        """Record which of the next T positions are real; returns the (B, length+T) key mask."""
        t = new.shape[1] if new is not None else t
        if self.length + t > self.max_len:
            raise ValueError(
                f"sequence of {self.length + t} tokens exceeds the cache's max_len={self.max_len}; "
                "allocate a larger cache (max_new_tokens + prompt length)"
            )
        self.mask[:, self.length : self.length + t] = True if new is None else new.bool()
        return self.mask[:, : self.length + t]

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.length + t
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def conv_state(self, layer: int) -> torch.Tensor:
        return self.conv[layer]

    def set_conv_state(self, layer: int, state: torch.Tensor) -> None:
        self.conv[layer].copy_(state)

    def advance(self, t: int) -> None:
        self.length += t

    # -- used by the engine ---------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return Snapshot(self.length, {i: s.clone() for i, s in self.conv.items()}, self.mask.clone())

    def restore(self, snap: Snapshot) -> None:
        self.length = snap.length
        for i, s in snap.conv.items():
            self.conv[i].copy_(s)
        self.mask.copy_(snap.mask)
