"""A quantized model's decode step in one C call (lfm2vl/native/step.c, lfm2vl/quant/step.py) is the
step torch's layers take: the same logits (up to the order of float32 sums, and the int8 rounding of
an activation that lands on a boundary), the same K/V and conv states written at the same places,
for rows at different lengths in one batch; and anything it was not written for keeps torch's layers."""

import pytest
import torch

import lfm2vl
from lfm2vl.model.linear import Linear
from lfm2vl.native import step as native_step
from lfm2vl.quant import step as quant_step

needs_step = pytest.mark.skipif(not native_step.available(), reason="lfm2vl/native not built here")
PROMPT = "Return the number of items in a container. Raise an error when the key is missing."


# transformers' own tiny LFM2-VL (tests/reference.py: hidden 64, 4 heads over 2 K/V heads) with conv
# biases (in_proj, out_proj and the conv taps), and with each grouping of query heads step.c
# specializes (1 to 4 a K/V head; 8 is two groups of 4) at head_dim 16, 8 and 16
TINY = {
    "conv_biases": {"conv_bias": True},
    "one_head_a_kv_head": {"num_key_value_heads": 4},
    "eight_heads_one_kv_head": {"num_attention_heads": 8, "num_key_value_heads": 1},
    "three_heads_a_kv_head": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import reference

    folders = {}

    def make(name: str):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name)
            reference.make_reference_checkpoint(folders[name], text=TINY[name])
        return folders[name]

    return make


def _decode(model, ids, rows, native: bool, steps: int = 6, calls: list | None = None):
    """Prefill row r with a prompt of its own length, then decode `steps` tokens over all rows at once."""
    text = model.module.language_model

    def spy(*args):
        out = quant_step.native_decode(*args)
        calls.append(out is not None)
        return out

    text.decode_step = spy if native else None
    cache = model.module.make_cache(4, 128)
    logits = []
    with torch.inference_mode():
        for r in rows:
            n = 5 + 7 * r
            model.module.forward(ids[:, :n], cache=cache.view([r], n), logits_to_keep=1)
        fed = torch.tensor([[5, 9, 11, 3], [40, 2, 17, 8], [21, 30, 6, 12], [7, 7, 9, 50], [3, 60, 14, 1], [9, 8, 7, 6]])
        for i in range(steps):
            tokens = fed[i, : len(rows), None]  # (B, 1), the same tokens on both paths
            if i == steps // 2:
                cache.grow(256)  # new K/V tensors mid-sequence: the C step must follow them
            out = model.module.forward(tokens, cache=cache.view(list(rows), 1))[:, -1]  # (B, V)
            logits.append(out)
    text.decode_step = quant_step.native_decode
    return torch.stack(logits), cache


@needs_step
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("source", ["bundled", *TINY])
def test_the_c_decode_step_is_the_layers_step(scheme, source, tiny):
    folder = None if source == "bundled" else tiny(source)
    model = lfm2vl.load(folder, quantize=scheme)
    assert model.module.language_model.decode_step is quant_step.native_decode
    ids = torch.tensor([model.processor.text_tokenizer.encode(PROMPT * 2)])
    for rows in [(0,), (2, 0, 3)]:  # one row; rows at three lengths, not in slot order
        calls: list[bool] = []
        expected, want = _decode(model, ids, rows, native=False)
        got, have = _decode(model, ids, rows, native=True, calls=calls)
        assert calls == [True] * 6
        # per (step, row): the same numbers up to float32 sums, except where one activation rounded to
        # the other side of an int8 boundary (torch's batched attention sums over the other rows'
        # masked keys too): one step of one group's grid, at most ~0.6% of the logits here
        off = ((got - expected).abs().amax(-1) / expected.abs().amax(-1)).flatten()  # (steps * B,)
        assert off.max() <= 1e-2 and (off <= 1e-4).float().mean() >= 2 / 3, off
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        assert have.host_lengths == want.host_lengths and torch.equal(have.lengths, want.lengths)
        # the states written, at the same places (a boundary rounding upstream moves them as it moves the logits)
        for states, expected_states in ((have.kt, want.kt), (have.v, want.v), (have.conv, want.conv)):
            for layer, t in expected_states.items():
                assert (states[layer] - t).abs().max() <= 1e-2 * t.abs().max(), layer
                assert torch.equal(states[layer] == 0, t == 0), layer  # nothing written elsewhere


@needs_step
def test_what_the_c_step_was_not_written_for_keeps_torchs_layers(monkeypatch):
    model = lfm2vl.load(quantize="int8")
    text = model.module.language_model
    cache = model.module.make_cache(1, 64)
    ids = torch.tensor([model.processor.text_tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        model.module.forward(ids, cache=cache.view([0], ids.shape[1]), logits_to_keep=1)
        embeds = model.module.embed(torch.tensor([[5]]))
        view = cache.view([0], 1)
        assert quant_step.native_decode(text, embeds, view) is not None  # the baseline: it runs
        assert quant_step.native_decode(text, embeds.half(), view) is None  # a compute dtype it does not take
        monkeypatch.setenv("LFM2VL_NATIVE_STEP", "0")
        assert quant_step.native_decode(text, embeds, view) is None
        monkeypatch.delenv("LFM2VL_NATIVE_STEP")
    assert quant_step.native_decode(text, embeds, view) is None  # gradients on
    # a layer that is not a quantized one (a float adapter, say) sends the whole step to torch's layers
    mlp = text.layers[1].feed_forward
    plain = Linear(mlp.w2.in_features, mlp.w2.out_features, bias=False)
    with torch.no_grad():
        plain.weight.copy_(mlp.w2.qweight.float() * mlp.w2.scale[:, None])
    mlp.w2 = plain
    with torch.inference_mode():
        assert quant_step.native_decode(text, embeds, view) is None
    conv = [{"role": "user", "content": [{"type": "image", "image": "examples/red_circle.png"},
                                         {"type": "text", "text": "what shape is in the image?"}]}]
    assert model.generate(conv) == "circle"  # and the model still answers, on torch's layers
    assert text.decode_state is not None
    model.to(dtype="float32")
    assert text.decode_state is None  # a move or cast drops the table (and its hold on the old weights)


@needs_step
def test_the_c_step_follows_weights_written_in_place_and_the_model_still_copies():
    import copy
    import pickle

    model = lfm2vl.load(quantize="int8", dtype="bfloat16")  # its table holds float32 copies of the norms
    net, text = model.module, model.module.language_model
    ids = torch.tensor([model.processor.text_tokenizer.encode(PROMPT)])
    cache, token = net.make_cache(1, 64), torch.tensor([[5]])
    with torch.inference_mode():
        net.forward(ids, cache=cache.view([0], ids.shape[1]), logits_to_keep=1)
        net.forward(token, cache=cache.view([0], 1))  # the C step, its table built
    assert text.decode_state is not None
    with torch.no_grad():
        text.embedding_norm.weight.mul_(3)
        text.layers[0].ffn_norm.weight.mul_(0.5)
    twin = copy.deepcopy(cache)
    with torch.inference_mode():
        got = net.forward(token, cache=cache.view([0], 1))[0, -1].float()  # the same cache: a table kept?
        text.decode_step = None
        expected = net.forward(token, cache=twin.view([0], 1))[0, -1].float()  # torch's layers
    text.decode_step = quant_step.native_decode
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()
    clone = copy.deepcopy(model.module)  # the table's raw pointers stay behind
    assert clone.language_model.decode_state is None and text.decode_state is not None
    assert pickle.loads(pickle.dumps(model.module)).language_model.decode_state is None


@needs_step
def test_the_c_step_renews_its_table_for_any_change_it_reads():
    """The table is checked each step against what it was built from (quant/step.py's _Watch): a
    replaced module or parameter, a tensor given new storage (.data =), a bf16 weight the table holds
    a copy of written in place, or a grown cache renews it, and a step on the renewed table is torch's."""
    import copy
    import gc
    import pickle

    model = lfm2vl.load(quantize="int8", dtype="bfloat16")
    net, text = model.module, model.module.language_model
    ids = torch.tensor([model.processor.text_tokenizer.encode(PROMPT)])
    cache, token = net.make_cache(1, 64), torch.tensor([[5]])
    with torch.inference_mode():
        net.forward(ids, cache=cache.view([0], ids.shape[1]), logits_to_keep=1)

    def step() -> object:
        with torch.inference_mode():
            view = cache.view([0], 1)
            assert quant_step.native_decode(text, net.embed(token), view) is not None
        return text.decode_state[0]

    last = text.layers[-1]
    spare = pickle.dumps(last.feed_forward.w3)

    def swap() -> None:  # the new layer is made after the old one is freed: it may be given the old one's id
        del last.feed_forward.w3
        gc.collect()
        last.feed_forward.w3 = pickle.loads(spare)

    first = step()
    assert step() is first  # nothing changed: the same table
    # it compares ids of objects it holds, so that no replacement made after a module or tensor was
    # freed can be given its id and pass for it
    assert any(o is last.feed_forward.w3 for o in first.held) and any(o is last.ffn_norm.weight for o in first.held)
    changes = [
        lambda: setattr(text, "embedding_norm", copy.deepcopy(text.embedding_norm)),
        lambda: setattr(last.feed_forward, "w1", copy.deepcopy(last.feed_forward.w1)),
        lambda: setattr(last.ffn_norm, "weight", torch.nn.Parameter(last.ffn_norm.weight * 2)),
        lambda: setattr(last.operator_norm.weight, "data", last.operator_norm.weight.data * 2),
        lambda: last.ffn_norm.weight.mul_(2),  # in place on a bf16 weight the table copied (not via .data)
        lambda: cache.grow(128),
        swap,
        swap,
    ]
    for change in changes:
        before = step()
        with torch.no_grad():
            change()
        assert step() is not before, changes.index(change)
    twin = copy.deepcopy(cache)
    with torch.inference_mode():
        got = net.forward(token, cache=cache.view([0], 1))[0, -1].float()
        text.decode_step = None
        expected = net.forward(token, cache=twin.view([0], 1))[0, -1].float()  # torch's layers
    text.decode_step = quant_step.native_decode
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()


@needs_step
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generation_with_the_c_step_is_generation_without_it(scheme, monkeypatch):
    questions = [[{"role": "user", "content": [{"type": "image", "image": f"examples/{name}.png"},
                                               {"type": "text", "text": "Describe the image."}]}]
                 for name in ("red_circle", "blue_triangle")]
    with_step = lfm2vl.load(quantize=scheme).generate(questions, max_new_tokens=24)
    monkeypatch.setenv("LFM2VL_NATIVE_STEP", "0")
    assert lfm2vl.load(quantize=scheme).generate(questions, max_new_tokens=24) == with_step


@needs_step
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_bf16_models_c_step_is_as_close_to_float32_as_torchs_bf16_layers(scheme):
    """step.c computes a bf16 model's step in float32 (its conv states stay bf16), where torch's
    layers round every operation to bf16: no farther from the float32 model than those."""
    wide, narrow = lfm2vl.load(quantize=scheme), lfm2vl.load(quantize=scheme, dtype="bfloat16")
    ids = torch.tensor([wide.processor.text_tokenizer.encode(PROMPT * 2)])
    rows = (2, 0, 3)
    reference, _ = _decode(wide, ids, rows, native=False)
    layers, want = _decode(narrow, ids, rows, native=False)
    calls: list[bool] = []
    got, have = _decode(narrow, ids, rows, native=True, calls=calls)
    assert calls == [True] * 6 and got.dtype == torch.bfloat16
    assert next(iter(have.conv.values())).dtype == torch.bfloat16 and have.host_lengths == want.host_lengths
    scale = reference.abs().max()
    assert (got.float() - reference).abs().max() <= 2 * (layers.float() - reference).abs().max() + 1e-3 * scale
