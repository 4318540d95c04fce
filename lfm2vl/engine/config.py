"""How an engine is sized: slots, per-step token budget, cache memory, queue bound (docs/engine.md)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..cpu import cpu_flags


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # requests decoding at once
    max_len: int | None = None  # positions per slot (prompt + generated); None = the model's context
    initial_len: int = 512  # the cache starts this long per slot and grows to what a request needs (cache_len)
    token_budget: int = 512  # tokens per step: the decode rows plus one prefill chunk
    # ... when no request is decoding (no stream waits on the step). Not larger on a CPU: each chunk's
    # activations are the request's peak memory (1.6B int8 image question: 1,951-1,976 MB at 512
    # against 2,136-2,189 at 2,048, three runs each, no slower; docs/performance.md)
    solo_token_budget: int = 512
    min_chunk: int = 32  # a prefill chunk is never smaller, however many rows decode
    image_cache_mb: float = 256.0
    prefix_cache_mb: float = 512.0
    max_queue: int | None = None  # submissions beyond this raise QueueFull (None = unbounded)

    def __post_init__(self) -> None:
        for name in ("max_slots", "initial_len", "token_budget", "solo_token_budget", "min_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError("EngineConfig.max_len must be >= 2")
        if self.image_cache_mb < 0 or self.prefix_cache_mb < 0:
            raise ValueError("cache sizes must be >= 0 MB (0 = off)")

    @classmethod
    def for_device(cls, device: torch.device | str, **overrides: Any) -> EngineConfig:
        """Defaults per device: a CPU batches a few rows; a GPU many, with larger steps and caches (at most
        an eighth of the GPU memory still free for the prefix cache and a sixteenth for the image cache,
        so a small card keeps its room for the K/V)."""
        if torch.device(device).type == "cuda":
            d = torch.device(device)  # free, plus what torch's allocator holds in reserve for reuse
            free_mb = (torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)) / 2**20
            base = cls(max_slots=32, initial_len=2048, token_budget=2048, solo_token_budget=2048,
                       image_cache_mb=min(1024.0, free_mb / 16), prefix_cache_mb=min(4096.0, free_mb / 8))
        else:
            base = cls()
        return replace(base, **overrides)


CACHE_STEP = 256  # the cache grows to a request's length rounded up to this many positions


def cache_len(n: int) -> int:
    """Positions per slot for a request of n tokens: rounded up to CACHE_STEP, not to a power of two,
    which held up to twice the K/V a request needs (a 1,400-token image question: 2,048 positions,
    50 MB of the 450M's float32 K/V where 1,536 hold 38); a longer request later grows it again.
    A request whose images must be encoded takes its K/V at its first prefill chunk, after them, so
    the vision tower's activations and the K/V are not held at once (Engine._start)."""
    return -(-n // CACHE_STEP) * CACHE_STEP


VISION_BATCH_PATCHES = 1024  # patches per vision call at most (one full tile): see Engine._encode_crop (scheduler.py)


def vision_batch_patches(device: torch.device, dtype: torch.dtype) -> int:
    """Patches per vision call at most: one full 512 x 512 tile (VISION_BATCH_PATCHES), or two for
    bf16 on a CPU with AMX-BF16, where oneDNN reorders each plain weight for the AMX tiles on every
    call (a weight reordered once ran 15-27% faster in an ad hoc microbenchmark) and more rows spread
    that cost: the 450M's bf16 vision tower 1.15 -> 0.80-0.85 s, int8's 1.17 ->
    0.91-1.00 s, about 15 MB more at peak for int8 (float32, without AMX, gained nothing; lfm2vl bench,
    docs/performance.md)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and "amx_bf16" in cpu_flags():
        return 2 * VISION_BATCH_PATCHES
    return VISION_BATCH_PATCHES
