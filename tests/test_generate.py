"""The generation engine: reference parity, cache invariants, batching, sampling, stop strings, streaming."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import lfm2vl
import reference
from invariants import assert_chunked_prefill_matches_full, assert_decode_matches_full
from lfm2vl.generate import Batch, generate_tokens
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


def _inputs(proc, items):
    texts = [t for t, _ in items]
    images = [imgs for _, imgs in items] if any(imgs for _, imgs in items) else None
    if images is not None and not all(images):
        raise ValueError("mixing text-only and image rows needs our processor")
    return dict(proc(text=texts, images=images, return_tensors="pt", padding=True))


def _ours(model, inputs, n, **kw):
    params = SamplingParams(max_new_tokens=n, **kw)
    steps = list(generate_tokens(model.module, Batch.from_inputs(inputs, model.device), params, (EOS,)))
    return torch.stack(steps, 1)  # (B, n)


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_greedy_tokens_equal_reference_generate(gen_ckpt, i):
    ref, ours, proc = gen_ckpt
    inputs = _inputs(proc, [PROMPTS[i]])
    with torch.no_grad():
        theirs = ref.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    theirs = theirs[0, inputs["input_ids"].shape[1] :].tolist()
    got = _ours(ours, inputs, 32, min_new_tokens=32)[0].tolist()
    assert got == theirs
    assert len(set(got)) > 4, "degenerate generation makes this test weak"


def _embeds(model, proc, items):
    inputs = _inputs(proc, items)
    net = model.module
    feats = None
    if "pixel_values" in inputs:
        feats = net.encode_images(inputs["pixel_values"], inputs["spatial_shapes"], inputs["pixel_attention_mask"])
    with torch.no_grad():
        return net.embed(inputs["input_ids"], feats), inputs["attention_mask"]


@pytest.mark.parametrize("items", [PROMPTS[2:3], PROMPTS[0:2], [PROMPTS[3], PROMPTS[6]]], ids=["image", "text_batch", "image_batch"])
def test_decode_and_chunked_prefill_invariants(gen_ckpt, items):
    _, ours, proc = gen_ckpt
    embeds, mask = _embeds(ours, proc, items)
    t = embeds.shape[1]
    assert_decode_matches_full(ours.module, embeds, mask, prefix=t - 12)
    assert_chunked_prefill_matches_full(ours.module, embeds, mask, splits=[1, 2, t // 3, t // 3 + 5, t - 1])


def test_snapshot_restore_is_exact(gen_ckpt):
    _, ours, proc = gen_ckpt
    net = ours.module
    embeds, mask = _embeds(ours, proc, [PROMPTS[2]])
    cache = lfm2vl.cache.HybridCache(net.cfg.text, 1, embeds.shape[1] + 8)
    with torch.no_grad():
        net.forward_embeds(embeds, mask, cache=cache)
        snap = cache.snapshot()
        tail = net.language_model.embed_tokens(torch.tensor([[11, 12, 13, 14]]))
        ones = torch.ones(1, 4, dtype=torch.long)
        first = net.forward_embeds(tail, ones, cache=cache)
        cache.restore(snap)
        other = net.forward_embeds(net.language_model.embed_tokens(torch.tensor([[99, 98]])), ones[:, :2], cache=cache)
        cache.restore(snap)
        again = net.forward_embeds(tail, ones, cache=cache)
    assert torch.equal(first, again)
    assert not torch.allclose(first[:, :2], other)


MIXED = [
    (_prompt("Tell me a story."), []),
    (_prompt("Describe this image in great detail please.", 1), [_image(300, 200, 1)]),
    (_prompt("Hi"), []),
    (_prompt("Compare.", 2), [_image(256, 384, 5), _image(100, 100, 8)]),
]


def test_batch_rows_equal_each_prompt_alone_in_every_order(gen_ckpt):
    """Batch sizes 1..4, every ordered selection of the 4 mixed prompts (left padding, text + image rows)."""
    _, ours, _ = gen_ckpt
    proc = ours.processor
    if proc is None:
        pytest.skip("needs our processor (mixed text-only and image rows)")
    n = 12

    def run(items):
        convs = [
            [{"role": "user", "content": [*({"type": "image", "image": im} for im in imgs), {"type": "text", "text": t}]}]
            for t, imgs in items
        ]
        texts = [proc.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        images = [imgs for _, imgs in items]
        inputs = proc(text=texts, images=images if any(images) else None)
        return _ours(ours, inputs, n, min_new_tokens=n)

    alone = [run([(t.split("user\n", 1)[1].split("<|im_end|>")[0].replace("<image>", ""), imgs)])[0] for t, imgs in MIXED]
    mixed = [(t.split("user\n", 1)[1].split("<|im_end|>")[0].replace("<image>", ""), imgs) for t, imgs in MIXED]
    for k in range(1, 5):
        for order in itertools.permutations(range(4), k):
            got = run([mixed[i] for i in order])
            for row, i in enumerate(order):
                assert torch.equal(got[row], alone[i]), f"order {order}: row {row} (prompt {i}) differs from alone"


# -- sampling ---------------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible(gen_ckpt):
    _, ours, proc = gen_ckpt
    inputs = _inputs(proc, [PROMPTS[2]])
    kw = dict(temperature=1.0, top_p=0.9, seed=1234)
    a, b = _ours(ours, inputs, 16, **kw), _ours(ours, inputs, 16, **kw)
    c = _ours(ours, inputs, 16, **{**kw, "seed": 99})
    assert torch.equal(a, b) and not torch.equal(a, c)


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
