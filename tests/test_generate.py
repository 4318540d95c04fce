"""Generation through the engine: reference parity, cache invariants, batching, sampling, stop strings, streaming."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import lfm2vl
import reference
from invariants import assert_chunked_prefill_matches_full, assert_decode_matches_full
from lfm2vl.engine import Engine, EngineConfig, Request
from lfm2vl.sampling import SamplingParams, apply_repetition_penalty, filter_logits, next_tokens
from lfm2vl.textstream import TextStream

EOS = 7


@pytest.fixture(scope="module")
def gen_ckpt(tmp_path_factory):
    """Larger init than the parity checkpoints, so greedy text is varied rather than one repeated token."""
    folder = tmp_path_factory.mktemp("gen")
    ref = reference.make_reference_checkpoint(folder, seed=7, text=dict(initializer_range=0.3))
    return ref, lfm2vl.load(folder), reference.load_reference_processor(folder)


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _prompt(text, n_images=0):
    return f"<|startoftext|><|im_start|>user\n{'<image>' * n_images}{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [
    (_prompt("Tell me a story."), []),
    (_prompt("What is the capital of France? Answer briefly."), []),
    (_prompt("Describe this image.", 1), [_image(300, 200, 1)]),
    (_prompt("What colour dominates?", 1), [_image(128, 512, 2)]),
    (_prompt("Read the text in this picture.", 1), [_image(1024, 800, 3)]),  # tiled + thumbnail
    (_prompt("Any people here?", 1), [_image(1600, 600, 4)]),  # tiled, wide
    (_prompt("Compare the two.", 2), [_image(256, 384, 5), _image(400, 300, 6)]),
    (_prompt("Which is brighter?", 2), [_image(900, 900, 7), _image(100, 100, 8)]),
]


def _request(model, item, n, **kw):
    text, images = item
    prompt = model.processor.text_prompt(text, images or None)
    params = SamplingParams(max_new_tokens=n, **kw)
    return Request(prompt.ids, params, frozenset({EOS}), prompt.images, prompt.image_token_id)


def _engine(model, **kw):
    return Engine(model.module, model.processor.decode, EngineConfig(**{"prefix_cache_mb": 0, "image_cache_mb": 0, **kw}))


def _run(model, items, n, **kw):
    """Token ids of each item, all submitted together to one fresh engine."""
    engine = _engine(model)
    handles = [engine.submit(_request(model, item, n, **kw)) for item in items]
    return [h.result().token_ids for h in handles]


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_greedy_tokens_equal_reference_generate(gen_ckpt, i):
    ref, ours, proc = gen_ckpt
    text, images = PROMPTS[i]
    inputs = dict(proc(text=[text], images=[images] if images else None, return_tensors="pt"))
    with torch.no_grad():
        theirs = ref.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    theirs = theirs[0, inputs["input_ids"].shape[1] :].tolist()
    got = _run(ours, [PROMPTS[i]], 32, min_new_tokens=32)[0]
    assert got == theirs
    assert len(set(got)) > 4, "degenerate generation makes this test weak"


def _rows(model, items):
    """(ids (T,), projected image features or None) per item."""
    out = []
    for text, images in items:
        prompt = model.processor.text_prompt(text, images or None)
        feats = None
        if prompt.images:
            with torch.no_grad():
                feats = torch.cat([model.module.encode_images(*img.pixels()) for img in prompt.images])
        out.append((torch.tensor(prompt.ids), feats))
    return out


@pytest.mark.parametrize("items", [PROMPTS[2:3], PROMPTS[0:2], [PROMPTS[3], PROMPTS[6], PROMPTS[0]]],
                         ids=["image", "text_batch", "mixed_batch"])
def test_decode_and_chunked_prefill_invariants(gen_ckpt, items):
    _, ours, _ = gen_ckpt
    rows = _rows(ours, items)
    # rows at different lengths decode together; the shortest finishes first and the batch shrinks
    assert_decode_matches_full(ours.module, rows, prefix=[len(ids) - 12 - 3 * i for i, (ids, _) in enumerate(rows)])
    ids, feats = rows[0]
    t = len(ids)
    assert_chunked_prefill_matches_full(ours.module, ids, feats, splits=[1, 2, t // 3, t // 3 + 5, t - 1])


def test_prefix_read_write_is_exact(gen_ckpt):
    """A state copied out of one slot and into another continues exactly as the original would."""
    _, ours, _ = gen_ckpt
    net = ours.module
    (ids, feats), = _rows(ours, [PROMPTS[2]])
    cache = net.make_cache(3, len(ids) + 8)
    tail = torch.tensor([[11, 12, 13, 14]])
    with torch.no_grad():
        net(ids[None], image_features=feats, cache=cache.view([0], len(ids)))
        state = cache.read_prefix(0, len(ids))
        first = net(tail, cache=cache.view([0], 4))
        cache.write_prefix(2, state, len(ids), state.conv)
        other = net(torch.tensor([[99, 98]]), cache=cache.view([2], 2))
        cache.write_prefix(2, state, len(ids), state.conv)
        again = net(tail, cache=cache.view([2], 4))
    assert torch.equal(first, again)
    assert not torch.allclose(first[:, :2], other)


MIXED = [
    (_prompt("Tell me a story."), []),
    (_prompt("Describe this image in great detail please.", 1), [_image(300, 200, 1)]),
    (_prompt("Hi"), []),
    (_prompt("Compare.", 2), [_image(256, 384, 5), _image(100, 100, 8)]),
]


def test_batch_rows_equal_each_prompt_alone_in_every_order(gen_ckpt):
    """Batch sizes 1..4, every ordered selection of the 4 mixed prompts (text + image rows, own lengths)."""
    _, ours, _ = gen_ckpt
    n = 12
    alone = [_run(ours, [item], n, min_new_tokens=n)[0] for item in MIXED]
    for k in range(1, 5):
        for order in itertools.permutations(range(4), k):
            got = _run(ours, [MIXED[i] for i in order], n, min_new_tokens=n)
            for row, i in enumerate(order):
                assert got[row] == alone[i], f"order {order}: row {row} (prompt {i}) differs from alone"


# -- sampling ---------------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_whatever_the_neighbours(gen_ckpt):
    _, ours, _ = gen_ckpt
    kw = dict(temperature=1.0, top_p=0.9, seed=1234)
    a = _run(ours, [PROMPTS[2]], 16, **kw)[0]
    b = _run(ours, [PROMPTS[0], PROMPTS[2], PROMPTS[6]], 16, **kw)[1]  # seeded neighbours too
    c = _run(ours, [PROMPTS[2]], 16, **{**kw, "seed": 99})[0]
    assert a == b and a != c


def test_filters_never_pick_excluded_tokens():
    torch.manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]]).repeat(4, 1)
    probs = logits.softmax(-1)[0]
    cases = {
        SamplingParams(temperature=1.0, top_k=3): {0, 1, 2},
        # smallest set with cumulative probability >= 0.9
        SamplingParams(temperature=1.0, top_p=0.9): set(range(int((probs.cumsum(0) < 0.9).sum()) + 1)),
        SamplingParams(temperature=1.0, min_p=0.1): {i for i in range(8) if probs[i] >= 0.1 * probs[0]},
    }
    for p, allowed in cases.items():
        kept = torch.isfinite(filter_logits(logits, p)[0]).nonzero().flatten().tolist()
        assert set(kept) == allowed, p
        picks = {int(t) for _ in range(300) for t in next_tokens(logits, torch.empty(4, 0, dtype=torch.long), p)}
        assert picks <= allowed and len(picks) > 1, (p, picks)


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_p():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.01))).flatten().tolist()
    assert kept == [True, False, False]


def test_repetition_penalty_matches_reference_definition():
    tf = reference.transformers()
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    history = torch.randint(0, 50, (3, 12))
    theirs = tf.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, history, 1.3), theirs)
    # padding (-1) in the history is ignored
    padded = torch.cat([torch.full((3, 4), -1), history], 1)
    torch.testing.assert_close(apply_repetition_penalty(logits, padded, 1.3), theirs)


def test_bad_sampling_params_are_rejected():
    for kw in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1), dict(top_k=-2),
               dict(max_new_tokens=0), dict(repetition_penalty=0), dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


# -- stop strings and streaming ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return reference.tokenizer()


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _stream(tok, text, stop=()):
    s = TextStream(_decode(tok), stop)
    pieces = []
    for i in tok.encode(text).ids:
        pieces.append(s.push(i))
        if s.finished:
            break
    pieces.append(s.finish("length"))
    return pieces, s


@pytest.mark.parametrize("text", ["Hello! How are you today?", "café naïve 東京 🙂 done", "🙂🙂 emoji 東京東京"])
def test_streaming_concatenation_equals_full_decode(tok, text):
    ids = tok.encode(text).ids
    assert len(ids) > len(text.split()), "byte-level tokens must split characters for this test to bite"
    pieces, s = _stream(tok, text)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces), "a broken UTF-8 character was emitted"


def test_stop_string_spanning_tokens_is_cut_exactly(tok):
    text = "The answer is 42. STOP_HERE and nothing else"
    stop = "STOP_HERE"
    ids = tok.encode(text).ids
    assert not any(stop in tok.decode([i]) for i in ids), "the stop string must span several tokens"
    pieces, s = _stream(tok, text, (stop,))
    assert "".join(pieces) == "The answer is 42. " == s.text and s.finish_reason == "stop"
    assert not any("STOP" in p or "S" == p[-1:] for p in pieces[:-1] if p), pieces


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tok):
    pieces, s = _stream(tok, "a b STOP_NOT end", ("STOP_HERE",))
    assert "".join(pieces) == "a b STOP_NOT end" and s.finish_reason == "length"


def test_earliest_of_several_stop_strings_wins(tok):
    pieces, s = _stream(tok, "one two three four", ("four", "two"))
    assert "".join(pieces) == "one " and s.finish_reason == "stop"
