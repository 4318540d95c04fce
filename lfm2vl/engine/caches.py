"""The engine's two caches, both LRU and bounded in bytes.

- `ImageCache`: projected image features (N_tokens, D) keyed by the image's content key (pixels +
  image settings). A second question about the same image skips the vision tower.
- `PrefixCache`: the model state after a token prefix, for the next turn of a conversation. An entry
  holds the KV rows of its whole key plus conv states captured at chosen boundaries inside it: KV
  rows can be cut at any length, a conv state only where it was captured (docs/engine.md). A lookup
  returns the longest stored boundary that is a prefix of the new prompt and leaves at least one
  token to prefill (the step that yields the next token's logits).

Evicted entries are dropped from the cache's only references, so their memory is freed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from ..model.cache import PrefixState


def _nbytes(tensors) -> int:
    """Bytes held by distinct tensors (a conv state shared by a state and a boundary counts once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


class _LRU:
    def __init__(self, capacity_mb: float):
        self.capacity = int(capacity_mb * 2**20)
        self.entries: OrderedDict = OrderedDict()
        self.sizes: dict = {}
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def _put(self, key, value, size: int) -> bool:
        if size > self.capacity:
            return False
        self._pop(key)
        while self.bytes + size > self.capacity:
            self._pop(next(iter(self.entries)))
            self.evictions += 1
        self.entries[key], self.sizes[key] = value, size
        self.bytes += size
        return True

    def _pop(self, key):
        if key not in self.entries:
            return None
        self.bytes -= self.sizes.pop(key)
        return self.entries.pop(key)

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.sizes.clear()
        self.bytes = 0

    def stats(self, name: str) -> dict[str, float]:
        return {f"{name}_hits": self.hits, f"{name}_misses": self.misses, f"{name}_entries": len(self),
                f"{name}_evictions": self.evictions, f"{name}_mb": round(self.bytes / 2**20, 3),
                f"{name}_capacity_mb": round(self.capacity / 2**20, 3)}


class ImageCache(_LRU):
    def get(self, key: str) -> torch.Tensor | None:
        feats = self.entries.get(key)
        if feats is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return feats

    def put(self, key: str, features: torch.Tensor) -> None:
        self._put(key, features, _nbytes([features]))


@dataclass
class PrefixEntry:
    key: tuple  # content key of the stored positions (len == state.length)
    state: PrefixState  # KV rows [0, len(key)) and the conv state at len(key)
    boundaries: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # length -> conv state

    @property
    def nbytes(self) -> int:
        s = self.state
        boundary_states = [t for conv in self.boundaries.values() for t in conv.values()]
        return _nbytes([*s.k.values(), *s.v.values(), *s.conv.values(), *boundary_states])


@dataclass(frozen=True)
class PrefixHit:
    entry: PrefixEntry
    length: int  # positions reused

    @property
    def conv(self) -> dict[int, torch.Tensor]:
        return self.entry.boundaries[self.length]


class PrefixCache(_LRU):
    """Boundaries are indexed by (length, key prefix), so a lookup costs one hash per distinct stored
    length, not a comparison with every entry (a cache of 7,800 short prompts made every lookup and
    insert scan them all: easy-VQA's rate fell from 173 to 41 questions/s; docs/evaluation.md)."""

    def __init__(self, capacity_mb: float):
        super().__init__(capacity_mb)
        self._ids = 0
        self.tokens_reused = 0
        self._index: dict[tuple[int, tuple], set[int]] = {}  # (n, key[:n]) -> entries with a boundary at n
        self._lengths: Counter[int] = Counter()  # boundary lengths present, with their counts

    def lookup(self, key: tuple) -> PrefixHit | None:
        best: tuple[int, int] | None = None  # (length, entry id)
        for length in sorted(self._lengths, reverse=True):
            if length < len(key) and (eids := self._index.get((length, key[:length]))):
                best = (length, next(iter(eids)))
                break
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.tokens_reused += best[0]
        self.entries.move_to_end(best[1])
        return PrefixHit(self.entries[best[1]], best[0])

    def insert(self, key: tuple, state: PrefixState, boundaries: dict[int, dict[int, torch.Tensor]]) -> None:
        """Store the state after `key` with conv states at `boundaries` (each <= len(key)).

        An entry whose key is a prefix of the new one is superseded: its boundaries move to the new
        entry and its KV rows are freed. If the new key is a prefix of a stored one, only the new
        boundaries are added there.
        """
        boundaries = {n: c for n, c in boundaries.items() if 0 < n <= len(key)}
        if not boundaries:
            return
        for eid, entry in list(self.entries.items()):
            n = len(entry.key)
            if n >= len(key) and entry.key[len(key) - 1] == key[-1] and entry.key[: len(key)] == key:
                self._pop(eid)  # out of the index while its boundaries change
                entry.boundaries.update({m: c for m, c in boundaries.items() if m not in entry.boundaries})
                self._put(eid, entry, entry.nbytes)  # now most recently used (or dropped if too big)
                return
            if 0 < n < len(key) and key[n - 1] == entry.key[-1] and key[:n] == entry.key:
                boundaries = {**entry.boundaries, **boundaries}
                self._pop(eid)
        entry = PrefixEntry(key, state, boundaries)
        self._ids += 1
        self._put(self._ids, entry, entry.nbytes)

    def _put(self, key, value, size: int) -> bool:
        stored = super()._put(key, value, size)
        if stored:
            for n in value.boundaries:
                self._index.setdefault((n, value.key[:n]), set()).add(key)
                self._lengths[n] += 1
        return stored

    def _pop(self, key):
        entry = super()._pop(key)
        if entry is not None:
            for n in entry.boundaries:
                eids = self._index[(n, entry.key[:n])]
                eids.discard(key)
                if not eids:
                    del self._index[(n, entry.key[:n])]
                self._lengths[n] -= 1
                if not self._lengths[n]:
                    del self._lengths[n]
        return entry

    def clear(self) -> None:
        super().clear()
        self._index.clear()
        self._lengths.clear()

    def stats(self, name: str = "prefix") -> dict[str, float]:
        return {**super().stats(name), f"{name}_tokens_reused": self.tokens_reused}
