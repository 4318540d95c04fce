"""The engine on real checkpoints (a tiny reference model saved by transformers, and the bundled model):
staggered joins and cancellations, prefix reuse across chat turns, the image cache, host syncs."""

import numpy as np
import pytest
import torch
from PIL import Image

import lfm2vl
import reference
from lfm2vl.engine import Engine, EngineConfig
from syncs import count_host_syncs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_ckpt")
    reference.make_reference_checkpoint(folder, seed=7, text=dict(initializer_range=0.3))
    return lfm2vl.load(folder)


@pytest.fixture(scope="module")
def bundled():
    return lfm2vl.load()


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]}


CONVS = [
    [_user("Tell me a story.")],
    [_user("Describe this image.", _image(300, 200, 1))],
    [_user("Compare the two.", _image(256, 384, 5), _image(900, 900, 7))],  # the second is tiled
    [_user("Hi")],
    [_user("What colour dominates?", _image(128, 512, 2))],
]
OPTS = dict(max_new_tokens=14, min_new_tokens=14)


def _fresh(model, **kw):
    return Engine(model.module, model.processor.decode, EngineConfig(**{"prefix_cache_mb": 0, "image_cache_mb": 0, **kw}))


def _req(model, conv, **opts):
    return model.request(conv, **{**OPTS, **opts})


def test_staggered_joins_and_cancellations_give_solo_tokens(model):
    solo = [_fresh(model).submit(_req(model, c)).result().token_ids for c in CONVS]
    e = Engine(model.module, model.processor.decode, EngineConfig(max_slots=3, token_budget=24, min_chunk=8))
    handles, victims = [], []
    for step in range(400):
        if step % 3 == 0 and len(handles) < 10:
            i = len(handles) % len(CONVS)
            handles.append((i, e.submit(_req(model, CONVS[i]))))
            if len(handles) % 4 == 0:  # every fourth one is cancelled a few steps later
                victims.append((step + 4, handles[-1][1]))
        for when, h in victims:
            if when == step:
                h.cancel()
        if not e.step() and len(handles) == 10:
            break
    for i, h in handles:
        if h.cancelled:
            assert h.completion.finish_reason == "cancelled"
            assert h.completion.token_ids == solo[i][: len(h.completion.token_ids)]
        else:
            assert h.completion.token_ids == solo[i], f"conversation {i} differs from its solo run"
    stats = e.stats()
    assert stats["active"] == 0 and stats["queued"] == 0 and stats["prefix_cache_hits"] > 0  # repeats resume


def test_second_chat_turn_reuses_the_prefix_and_equals_a_cold_run(model):
    e = Engine(model.module, model.processor.decode, EngineConfig())
    conv = [_user("Describe this image.", _image(900, 700, 3))]
    first = e.submit(_req(model, conv)).result()
    crops_after_first = e.counters["vision_crops"]
    turn2 = conv + [{"role": "assistant", "content": first.text}, _user("And the colours?")]
    warm = e.submit(_req(model, turn2)).result()
    cold = _fresh(model).submit(_req(model, turn2)).result()
    assert warm.token_ids == cold.token_ids
    # a random model's reply ("\ufffd" pieces) does not re-tokenize to its tokens: the prompt boundary is reused
    assert warm.cached_tokens >= first.prompt_tokens
    assert e.counters["vision_crops"] == crops_after_first, "the image was covered by the prefix: no vision work"
    assert e.stats()["prefix_cache_hits"] == 1


def test_image_cache_hit_skips_the_vision_tower(bundled):
    e = Engine(bundled.module, bundled.processor.decode, EngineConfig(prefix_cache_mb=0))
    calls = []
    hook = bundled.module.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        for question in ("what shape is in the image?", "what color is the shape?"):
            c = e.submit(_req(bundled, [_user(question, "examples/red_circle.png")], max_new_tokens=4, min_new_tokens=0))
            c.result()
    finally:
        hook.remove()
    assert len(calls) == 1 and e.stats()["image_cache_hits"] == 1 and e.stats()["image_cache_misses"] == 1


def test_bundled_chat_turn_reuses_prompt_and_reply(bundled):
    e = Engine(bundled.module, bundled.processor.decode, EngineConfig())
    conv = [_user("what shape is in the image?", "examples/red_circle.png")]
    first = e.submit(_req(bundled, conv, max_new_tokens=8, min_new_tokens=0)).result()
    assert first.text == "circle" and first.finish_reason == "stop"
    turn2 = conv + [{"role": "assistant", "content": first.text}, _user("what color is the shape?")]
    warm = e.submit(_req(bundled, turn2, max_new_tokens=8, min_new_tokens=0)).result()
    assert warm.text == "red"
    assert warm.cached_tokens == first.prompt_tokens + len(first.token_ids)  # prompt + every reply token


def test_bundled_model_batch_equals_one_at_a_time(bundled):
    questions = ["what shape is in the image?", "what color is the shape?", "is there a circle?", "is it blue?"]
    convs = [[_user(q, "examples/red_circle.png")] for q in questions]
    alone = [bundled.complete(c, max_new_tokens=6)[0].text for c in convs]
    assert bundled.generate(convs, max_new_tokens=6) == alone
    assert alone[0] == "circle" and alone[1] == "red"


def test_decode_step_makes_no_host_syncs(model):
    """The model's decode forward reads nothing back from the device (torch.compile / CUDA graphs can
    capture it); a whole engine step reads the sampled tokens once."""
    e = Engine(model.module, model.processor.decode, EngineConfig(prefix_cache_mb=0))
    handles = [e.submit(_req(model, c, max_new_tokens=30, min_new_tokens=30)) for c in CONVS[:4]]
    while any(not h.completion.token_ids for h in handles):  # until all four are decoding
        e.step()
    net = model.module
    with count_host_syncs() as model_syncs:
        view = e.cache.view([0, 1, 2, 3], 1)
        with torch.inference_mode():
            net(torch.tensor([[5], [6], [7], [8]]), cache=view)
    assert sum(model_syncs.values()) == 0, dict(model_syncs)
    with count_host_syncs() as step_syncs:
        e.step()
    assert dict(step_syncs) == {"tolist": 1}, dict(step_syncs)


def test_cache_memory_bounds_hold_on_the_bundled_model(bundled):
    import gc
    import weakref

    probe = Engine(bundled.module, bundled.processor.decode, EngineConfig())
    probe.submit(_req(bundled, [_user("what shape is in the image?", "examples/red_circle.png")], max_new_tokens=4,
                      min_new_tokens=0)).result()
    entry_mb = probe.prefix_cache.bytes / 2**20
    feats_mb = probe.image_cache.bytes / 2**20
    e = Engine(bundled.module, bundled.processor.decode,
               EngineConfig(prefix_cache_mb=entry_mb * 2.5, image_cache_mb=feats_mb * 1.5))  # ~2 entries, 1 image
    refs = []
    for i, q in enumerate(["what shape is in the image?", "what color is the shape?", "is it red?", "is it a circle?"]):
        image = _image(64, 64, 100 + i)  # new content each time: a new image-cache key
        e.submit(_req(bundled, [_user(q, image)], max_new_tokens=4, min_new_tokens=0)).result()
        refs.append(weakref.ref(next(reversed(e.prefix_cache.entries.values())).state.k[bundled.config.text.attention_layers[0]]))
        assert e.prefix_cache.bytes <= e.prefix_cache.capacity and e.image_cache.bytes <= e.image_cache.capacity
    gc.collect()
    stats = e.stats()
    assert stats["prefix_cache_evictions"] >= 2 and stats["image_cache_evictions"] >= 3
    assert sum(r() is None for r in refs) >= 2, "evicted prefix states must be freed"
