"""The prefix cache's index (lfm2vl/engine/caches.py) answers every lookup as a scan of all entries
would: the longest stored boundary that is a prefix of the new key and leaves a token to prefill,
through inserts that supersede, extend and evict entries."""

import random

import torch

from lfm2vl.engine.caches import PrefixCache
from lfm2vl.model.cache import PrefixState


def _state(length: int) -> PrefixState:
    kv = {0: torch.zeros(1, length, 4)}  # 16 bytes a position: the capacity evicts
    return PrefixState(length, kv, {0: torch.zeros(1, length, 4)}, {1: torch.zeros(4, 2)})


def _scan(cache: PrefixCache, key: tuple) -> int:
    best = 0
    for entry in cache.entries.values():
        for n in entry.boundaries:
            if best < n < len(key) and entry.key[:n] == key[:n]:
                best = n
    return best


def test_the_index_answers_as_a_scan_would():
    rng = random.Random(0)
    cache = PrefixCache(capacity_mb=0.01)  # ~10 kB: evictions all along
    stems = [tuple(rng.randrange(6) for _ in range(rng.randrange(3, 20))) for _ in range(12)]
    hits = 0
    for _ in range(2000):
        key = rng.choice(stems) + tuple(rng.randrange(6) for _ in range(rng.randrange(0, 12)))
        if not key:
            continue
        expected = _scan(cache, key)
        hit = cache.lookup(key)
        assert (hit.length if hit else 0) == expected, key
        if hit:
            hits += 1
            assert hit.entry.key[: hit.length] == key[: hit.length] and hit.length in hit.entry.boundaries
        conv = {1: torch.zeros(4, 2)}
        cache.insert(key, _state(len(key)), {len(key): conv, max(1, len(key) - 1): conv})
        for (n, prefix), eids in cache._index.items():  # the index holds exactly the stored boundaries
            assert eids and all(cache.entries[e].key[:n] == prefix and n in cache.entries[e].boundaries for e in eids)
        assert sum(len(e.boundaries) for e in cache.entries.values()) == sum(cache._lengths.values())
    assert hits > 500 and cache.evictions > 0
