"""Engine behaviour on a mock model with known logits and a byte tokenizer (nanochat's approach).

No checkpoint and no transformers: the mock's next token is a pure function of the running sum of
every token so far (kept in the cache's conv state, so prefix reuse and slot bookkeeping are
exercised for real) and of the position. `expected()` computes the same sequence in plain Python.
"""

import asyncio
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from lfm2vl.config import TextConfig
from lfm2vl.engine import Engine, EngineConfig, EngineError, QueueFull, Request
from lfm2vl.model.cache import HybridCache
from lfm2vl.sampling import SamplingParams

V, EOS, IMAGE = 260, 257, 259  # bytes 0..255, then specials
M = 256 * 37  # the running sum is stored modulo M (a multiple of 256 keeps the arithmetic exact)


def target(total: int, pos: int) -> int:
    return (total * 7 + pos * 3) % 256


class MockModel:
    def __init__(self):
        text = TextConfig(vocab_size=V, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                          num_attention_heads=1, num_key_value_heads=1, layer_types=("conv", "full_attention"),
                          max_position_embeddings=4096)
        self.cfg = SimpleNamespace(text=text, image_token_id=IMAGE)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.vision_calls = 0
        self.forward_tokens = 0

    def make_cache(self, slots, max_len):
        return HybridCache(self.cfg.text, slots, max_len)

    def encode_images(self, values, shapes):
        self.vision_calls += 1
        (h, w), = shapes
        return values[: (h // 2) * (w // 2), :4].clone()  # (tokens, D): column 0 is the value the mock adds

    def forward(self, input_ids, *, image_features=None, cache, logits_to_keep=0):
        b, t = input_ids.shape
        self.forward_tokens += b * t
        vals = input_ids.double()
        if image_features is not None:
            vals[input_ids == IMAGE] = image_features[:, 0].double()
        state = cache.conv_state(0).double()  # (B, D, K-1); [:, 0, -1] = running sum so far
        sums = state[:, 0, -1:] + vals.cumsum(1)  # (B, T)
        full = torch.zeros(b, 4, state.shape[-1] + t, dtype=torch.float32)
        full[:, 0, : state.shape[-1]] = state[:, 0].float()
        full[:, 0, state.shape[-1] :] = (sums % M).float()
        cache.set_conv_state(0, full)
        kv = torch.zeros(b, 1, t, 4)
        cache.kv(1, kv, kv)
        tgt = ((sums * 7 + cache.positions.double() * 3) % 256).long()  # (B, T)
        logits = -(torch.arange(V)[None, None, :] - tgt[..., None]).abs().float() * 0.5
        logits[..., 256:] = -1e4
        cache.advance()
        return logits[:, -logits_to_keep:] if logits_to_keep else logits


def expected(prompt_vals: list[float], n: int, stop_ids=()) -> list[int]:
    total, out = 0, []
    for v in prompt_vals:
        total += int(v)
    pos = len(prompt_vals) - 1
    for _ in range(n):
        tok = target(total, pos)
        if tok in stop_ids:
            break
        out.append(tok)
        total += tok
        pos += 1
    return out


def decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def engine(**kw):
    return Engine(MockModel(), decode, EngineConfig(**kw))


def req(ids, n=20, images=(), **kw):
    return Request(ids, SamplingParams(max_new_tokens=n, **kw), frozenset({EOS}), images, IMAGE if images else None)


PROMPTS = [[1, 2, 3], [50] * 40, [7, 9], list(range(100, 190))]


def test_greedy_tokens_and_finish_reason():
    e = engine()
    for p in PROMPTS:
        c = e.submit(req(p, 25)).result()
        assert c.token_ids == expected(p, 25) and c.finish_reason == "length" and c.completion_tokens == 25
        assert c.prompt_tokens == len(p)


def test_the_cache_holds_slots_for_the_requests_that_run_together_only():
    e = engine(max_slots=8)
    for p in PROMPTS:  # one at a time: one slot, however many the engine may run
        assert e.submit(req(p, 25)).result().token_ids == expected(p, 25)
    assert e.cache.slots == 1
    handles = [e.submit(req(p, 25)) for p in PROMPTS + PROMPTS[:1]]  # five at once: 1 -> 2 -> 4 -> 8 slots
    while not all(h.done for h in handles):
        e.step()
    assert [h.result().token_ids for h in handles] == [expected(p, 25) for p in PROMPTS + PROMPTS[:1]]
    assert e.cache.slots == 8
    e3 = engine(max_slots=3)
    handles = [e3.submit(req(p, 25)) for p in PROMPTS]
    while not all(h.done for h in handles):
        e3.step()
    assert [h.result().token_ids for h in handles] == [expected(p, 25) for p in PROMPTS]
    assert e3.cache.slots == 3  # never past max_slots


def test_the_cache_grows_to_what_a_request_needs_in_steps_of_cache_step():
    from lfm2vl.engine.config import CACHE_STEP

    e = engine(initial_len=16)
    prompt = [7] * (2 * CACHE_STEP + 50)  # with its new tokens 3 steps (a power of two: 4)
    assert e.submit(req(prompt, 30)).result().token_ids == expected(prompt, 30)
    assert e.cache.max_len == 3 * CACHE_STEP
    longer = [9] * (4 * CACHE_STEP + 40)
    assert e.submit(req(longer, 25)).result().token_ids == expected(longer, 25)
    assert e.cache.max_len == 5 * CACHE_STEP  # 8 with powers of two
    assert e.submit(req(prompt, 30)).result().token_ids == expected(prompt, 30)  # a shorter one fits as it is
    assert e.cache.max_len == 5 * CACHE_STEP


def test_going_idle_after_work_returns_freed_memory_at_most_once_an_interval(monkeypatch):
    from lfm2vl.engine import scheduler

    trims = []
    monkeypatch.setattr(scheduler, "release_freed_memory", lambda: trims.append(1))
    e = engine(max_slots=2)
    e.step()  # idle without work: nothing to return
    assert trims == []
    a, b = e.submit(req(PROMPTS[0], 5)), e.submit(req(PROMPTS[1], 5))
    while not (a.done and b.done):
        e.step()
        assert trims == [] or (a.done and b.done)  # never while a request is running
    assert len(trims) == 1  # the step that went idle
    e.step()
    assert len(trims) == 1  # idle again, but nothing ran since
    e.submit(req(PROMPTS[2], 3)).result()
    assert len(trims) == 1  # within TRIM_INTERVAL_S of the last trim
    monkeypatch.setattr(scheduler, "TRIM_INTERVAL_S", 0.0)
    e.submit(req(PROMPTS[2], 3)).result()
    assert len(trims) == 2


def test_staggered_joins_give_each_request_its_solo_tokens():
    e = engine(max_slots=3, token_budget=8, min_chunk=4)
    handles = []
    for step in range(60):  # a new request every 5 steps; more requests than slots (they queue)
        if step % 5 == 0 and len(handles) < 8:
            p = PROMPTS[len(handles) % 4] + [len(handles)]
            handles.append((p, e.submit(req(p, 10 + 3 * len(handles)))))
        e.step()
    e.run_until_done()
    for i, (p, h) in enumerate(handles):
        assert h.completion.token_ids == expected(p, 10 + 3 * i), i
    assert e.stats()["active"] == 0


def test_cancel_frees_the_slot_and_leaves_the_others_alone():
    e = engine(max_slots=2)
    a, b = e.submit(req(PROMPTS[0], 50)), e.submit(req(PROMPTS[1], 30))
    c = e.submit(req(PROMPTS[2], 30))  # queued: no free slot
    for _ in range(5):
        e.step()
    a.cancel()
    e.step()
    assert a.completion.finish_reason == "cancelled" and 0 < len(a.completion.token_ids) < 50
    e.run_until_done()
    assert b.completion.token_ids == expected(PROMPTS[1], 30)
    assert c.completion.token_ids == expected(PROMPTS[2], 30)  # got the freed slot
    queued = e.submit(req(PROMPTS[0], 5))
    queued.cancel()
    assert queued.result().finish_reason == "cancelled" and queued.completion.token_ids == []


def test_stop_strings_stop_ids_min_new_tokens_and_eos():
    e = engine()
    full = expected(PROMPTS[3], 40)
    text = decode(full)
    stop = text[10:12]
    c = e.submit(req(PROMPTS[3], 40, stop=(stop,))).result()
    assert c.finish_reason == "stop" and c.text == text[: text.index(stop)]
    c = e.submit(req(PROMPTS[3], 40, stop_token_ids=(full[7],))).result()  # stop ids come from the Request
    assert c.completion_tokens == 40  # stop_token_ids in params alone do not stop: the Request's stop_ids do
    r = Request(PROMPTS[3], SamplingParams(max_new_tokens=40), frozenset({full[7]}))
    c = e.submit(r).result()
    assert c.finish_reason == "stop" and c.token_ids == full[: full.index(full[7])]
    r = Request(PROMPTS[3], SamplingParams(max_new_tokens=40, min_new_tokens=30), frozenset({full[7]}))
    assert full[7] not in e.submit(r).result().token_ids[:30]
    c = e.submit(Request(PROMPTS[3], SamplingParams(max_new_tokens=40), frozenset({full[0]}))).result()
    assert c.finish_reason == "stop" and c.token_ids == [] and 0 < c.ttft_s <= c.total_s  # a stop first is timed


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours():
    kw = dict(temperature=1.0, seed=3)
    alone = engine().submit(req(PROMPTS[0], 30, **kw)).result().token_ids
    e = engine()
    hs = [e.submit(req(PROMPTS[1], 30, temperature=1.0)), e.submit(req(PROMPTS[0], 30, **kw)),
          e.submit(req(PROMPTS[2], 30, temperature=1.0, seed=4))]
    together = [h.result().token_ids for h in hs]
    assert together[1] == alone
    assert engine().submit(req(PROMPTS[0], 30, temperature=1.0, seed=4)).result().token_ids != alone
    assert alone != expected(PROMPTS[0], 30), "temperature 1 should not reproduce greedy here"


def test_long_prompt_is_chunked_while_running_streams_keep_flowing():
    e = engine(token_budget=16, min_chunk=8)
    running = e.submit(req(PROMPTS[0], 200))
    for _ in range(3):
        e.step()
    long = e.submit(req(list(range(1, 250)) * 2, 5))
    got_while_waiting = 0
    while not long.completion.token_ids:
        before = len(running.completion.token_ids)
        e.step()
        got_while_waiting += len(running.completion.token_ids) - before
    assert got_while_waiting >= 498 // 16 - 1, got_while_waiting  # a token per step during the prefill
    e.run_until_done()
    assert long.completion.token_ids == expected(list(range(1, 250)) * 2, 5)
    assert running.completion.token_ids == expected(PROMPTS[0], 200)


def test_prefix_cache_reuses_the_previous_turn_exactly():
    e = engine()
    turn1 = [1, 2, 3, 4, 5] * 10
    first = e.submit(req(turn1, 12)).result()
    turn2 = turn1 + first.token_ids + [EOS, 10, 11, 12]  # reply, end of turn, next question
    before = e.counters["prefilled_tokens"]
    warm = e.submit(req(turn2, 15)).result()
    assert warm.cached_tokens == len(turn1) + 11  # all but the last reply token were fed to the model
    assert e.counters["prefilled_tokens"] - before == len(turn2) - warm.cached_tokens
    cold = engine(prefix_cache_mb=0).submit(req(turn2, 15)).result()
    assert warm.token_ids == cold.token_ids == expected(turn2, 15) and cold.cached_tokens == 0
    again = e.submit(req(turn2, 15)).result()  # the identical prompt: resumes one token before its end
    assert again.cached_tokens == len(turn2) - 1 and again.token_ids == cold.token_ids
    assert e.stats()["prefix_cache_hits"] == 2


class Img:
    def __init__(self, key, value, tokens=4):
        self.key, self.value, self.tokens = key, value, tokens
        self.pixel_calls = 0

    def pixels(self):
        self.pixel_calls += 1
        return torch.full((self.tokens * 4, 8), float(self.value)), [(4, self.tokens)]  # (h*w patches, dim), one crop


def _image_prompt(n_images, tokens=4):
    ids = [1, 2]
    for _ in range(n_images):
        ids += [3] + [IMAGE] * tokens + [4]
    return ids + [5, 6]


def _vals(ids, values):
    out, it = [], iter(v for v in values for _ in range(4))
    for t in ids:
        out.append(next(it) if t == IMAGE else t)
    return out


def test_image_cache_skips_the_vision_tower_and_prefix_covers_images():
    e = engine()
    img = Img("a", 9)
    ids = _image_prompt(1)
    c1 = e.submit(req(ids, 8, images=[img])).result()
    assert e.model.vision_calls == 1 and c1.token_ids == expected(_vals(ids, [9]), 8)
    other = _image_prompt(1)[:-2] + [9, 9]  # same image (content key), another question: no stored boundary fits
    c2 = e.submit(req(other, 8, images=[Img("a", 9)])).result()
    assert e.model.vision_calls == 1 and e.stats()["image_cache_hits"] == 1
    assert c2.token_ids == expected(_vals(other, [9]), 8)
    two = _image_prompt(2)
    c3 = e.submit(req(two, 8, images=[Img("a", 9), Img("b", 2)])).result()
    assert e.model.vision_calls == 2 and c3.token_ids == expected(_vals(two, [9, 2]), 8)
    # next turn of an image chat: the prefix covers the image, so its pixels are never even made
    turn2 = two + c3.token_ids + [EOS, 8]
    again = Img("b", 2)
    c4 = e.submit(req(turn2, 8, images=[Img("a", 9), again])).result()
    assert again.pixel_calls == 0 and c4.cached_tokens > len(two)
    assert c4.token_ids == expected(_vals(turn2, [9, 2]), 8)


def test_cache_memory_bounds_hold_and_evicted_entries_are_freed():
    e = engine(prefix_cache_mb=0.005, image_cache_mb=0.0002)  # 5 KB of prefix state (~3 entries), 200 B of features
    refs = []
    for i in range(12):
        e.submit(req([i + 1] * 30, 10)).result()
        entry = next(reversed(e.prefix_cache.entries.values()))
        refs.append(weakref.ref(entry.state.k[1]))
        assert e.prefix_cache.bytes <= e.prefix_cache.capacity
    for i in range(6):
        e.submit(req(_image_prompt(1), 3, images=[Img(f"k{i}", i)])).result()
        assert e.image_cache.bytes <= e.image_cache.capacity
    gc.collect()
    assert e.prefix_cache.evictions > 0 and e.image_cache.evictions > 0
    assert sum(r() is None for r in refs) >= e.prefix_cache.evictions  # evicted KV tensors are gone


def test_errors_finish_one_request_and_the_engine_keeps_serving():
    class Broken(Img):
        def pixels(self):
            raise OSError("truncated file")

    e = engine()
    bad = e.submit(req(_image_prompt(1), 5, images=[Broken("x", 1)]))
    good = e.submit(req(PROMPTS[0], 5))
    with pytest.raises(EngineError, match="truncated file"):
        bad.result()
    assert good.result().token_ids == expected(PROMPTS[0], 5)
    with pytest.raises(ValueError, match="image tokens"):
        e.submit(req([1, IMAGE, 2], 5, images=[Img("y", 1)]))  # 1 slot for a 4-token image: refused at submit
    with pytest.raises(ValueError, match="context"):
        e.submit(req([1] * 4000, 200))
    full = engine(max_queue=1, max_slots=1)
    full.submit(req(PROMPTS[0], 5))
    with pytest.raises(QueueFull):
        full.submit(req(PROMPTS[0], 5))


def test_worker_thread_and_async_streaming():
    e = engine()
    e.start()
    try:
        threaded = [e.submit(req(p, 15)) for p in PROMPTS]
        assert [h.result().token_ids for h in threaded] == [expected(p, 15) for p in PROMPTS]

        async def consume():
            h = e.submit(req(PROMPTS[1], 12, stop=()), loop=asyncio.get_running_loop())
            return [ev async for ev in h.events_async()]

        events = asyncio.run(consume())
        assert [ev.token for ev in events if ev.token is not None] == expected(PROMPTS[1], 12)
        assert events[-1].finish_reason == "length" and events[-1].generation_tokens == 12
        assert e.stats()["active"] == 0
    finally:
        e.stop()


def test_vision_calls_take_two_tiles_only_in_bf16_on_amx_cpus(monkeypatch):
    from lfm2vl.engine import config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for flags, dtype, want in (({"amx_bf16"}, torch.bfloat16, 2048), ({"amx_bf16"}, torch.float32, 1024),
                               ({"avx512_bf16"}, torch.bfloat16, 1024), (set(), torch.float32, 1024)):
        monkeypatch.setattr(config, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert config.vision_batch_patches(cpu, dtype) == want, (flags, dtype)
        assert config.vision_batch_patches(cuda, dtype) == 1024
    model = MockModel()
    model.dtype = torch.bfloat16
    assert Engine(model, decode, EngineConfig()).vision_patches == 1024  # the last flags: no AMX
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert Engine(model, decode, EngineConfig()).vision_patches == 2048
