"""Training data: validation errors name file and line, assistant-only labels, truncation, collate."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_train_utils import write_images, write_jsonl

import lfm2vl
from lfm2vl.train.batch import IGNORE, assistant_labels, collate, encode
from lfm2vl.train.data import DataError, open_data, read_jsonl




@pytest.fixture(scope="module")
def processor(tiny_train_ckpt):
    return lfm2vl.load(tiny_train_ckpt).processor


def _multi_turn(img: str) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Sure?\n\n"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes, "}, {"type": "text", "text": "red."}]},
    ]


def test_assistant_only_labels_multi_turn(processor, tmp_path):
    write_images(tmp_path)
    messages = _multi_turn(str(tmp_path / "imgs" / "red.png"))
    ids = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)["input_ids"][0].tolist()
    labels = assistant_labels(ids, processor)

    # Independent derivation, prefix by prefix: an assistant turn starts where the prompt with a
    # generation prompt ends, and ends with the <|im_end|> before the next turn's trailing newline.
    def n_tokens(prefix: list[dict], gen: bool) -> int:
        return processor.apply_chat_template(prefix, add_generation_prompt=gen, tokenize=True)["input_ids"].shape[1]

    expected = set()
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = n_tokens(messages[:k], True), n_tokens(messages[:k + 1], False) - 1  # drop the final "\n"
            assert ids[end - 1] == processor.eos_token_id  # <|im_end|>
            expected |= set(range(start, end))
    labelled = {i for i, lab in enumerate(labels) if lab != IGNORE}
    assert labelled == expected
    assert all(labels[i] == ids[i] for i in labelled)
    # What is learnt: both answers with their closing <|im_end|>, nothing of the prompt or the image.
    spans = processor.decode([ids[i] for i in sorted(labelled)], skip_special_tokens=False)
    assert spans == "Red.<|im_end|>Yes, red.<|im_end|>"
    assert processor.image_token_id in ids and all(labels[i] == IGNORE for i, t in enumerate(ids) if t == processor.image_token_id)


def test_encode_matches_chat_template_and_packs_images(processor, color_data):
    source = open_data(color_data)
    ex = encode(processor, source.record(0), max_length=512)
    ref = processor.apply_chat_template(source.record(0).messages, add_generation_prompt=False, tokenize=True, packed=True)
    assert ex.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert ex.pixel_values.shape == (16, 768) and ex.spatial_shapes.tolist() == [[4, 4]]
    assert processor.decode(ex.input_ids[ex.labels != IGNORE], skip_special_tokens=False) == "The color is red.<|im_end|>"


def test_text_record_targets_every_token(processor, tmp_path):
    src = read_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "Two dogs play in the snow."}]))
    ex = encode(processor, src.record(0), max_length=512)
    assert ex.input_ids[0] == processor.bos_token_id and ex.labels[0] == IGNORE
    assert (ex.labels[1:] == ex.input_ids[1:]).all() and ex.pixel_values is None


def test_bad_jsonl_lines_are_named(tmp_path):
    write_images(tmp_path)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [
        good,
        "",  # blank lines are skipped
        '{"messages": [',  # line 3: broken JSON
        {"messages": [{"role": "user", "content": "no answer"}]},  # line 4: nothing to learn
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/nope.png"}]},
                      {"role": "assistant", "content": "x"}]},  # line 5: missing image
        {"messages": [{"role": "robot", "content": "x"}]},  # line 6: bad role
        good,
    ])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert "4 bad record(s)" in msg
    for line, words in ((3, "Expecting"), (4, "no assistant message"), (5, "nope.png"), (6, "role")):
        assert f"train.jsonl:{line}:" in msg and words in msg
    assert "train.jsonl:1:" not in msg and "train.jsonl:7:" not in msg


def test_image_forms_and_trl_images_list(processor, tmp_path):
    write_images(tmp_path)
    answer = {"role": "assistant", "content": "ok"}
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/red.png"}}]}, answer]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}, answer],
         "images": ["imgs/red.png", "imgs/blue.png"]},
    ])
    src = read_jsonl(path)
    assert src.record(0).messages[0]["content"][0] == {"type": "image", "image": str(tmp_path / "imgs" / "red.png")}
    ex = encode(processor, src.record(1), 512)
    assert ex.spatial_shapes.shape == (2, 2) and int((ex.input_ids == processor.image_token_id).sum()) == 8
    with pytest.raises(DataError, match=r"d2.jsonl:1: .*more image"):
        read_jsonl(write_jsonl(tmp_path / "d2.jsonl", [{"messages": [{"role": "user", "content": "x"}, answer],
                                                       "images": ["imgs/red.png"]}]))
    with pytest.raises(DataError, match="assistant messages cannot contain images"):
        read_jsonl(write_jsonl(tmp_path / "d3.jsonl", [{"messages": [
            {"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image", "image": "imgs/red.png"}]}]}]))


def test_truncation_never_splits_an_image(processor, color_data):
    rec = open_data(color_data).record(0)
    full = encode(processor, rec, 512)
    cut = encode(processor, rec, len(full.input_ids) - 3)
    assert cut.input_ids.tolist() == full.input_ids[:-3].tolist()
    with pytest.raises(DataError, match="train.jsonl:1: .*split an image"):
        encode(processor, rec, 6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_and_concatenates_crops(processor, color_data, side):
    src = open_data(color_data)
    exs = [encode(processor, src.record(i), 512) for i in (4, 0, 1)]  # text-only, then two images
    b = collate(exs, pad_id=processor.pad_token_id, padding_side=side)
    length = max(len(e.input_ids) for e in exs)
    assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape == (3, length)
    for row, e in enumerate(exs):
        n = len(e.input_ids)
        real = slice(0, n) if side == "right" else slice(length - n, length)
        pad = slice(n, length) if side == "right" else slice(0, length - n)
        assert b.input_ids[row, real].tolist() == e.input_ids.tolist()
        assert b.labels[row, real].tolist() == e.labels.tolist()
        assert (b.attention_mask[row, real] == 1).all() and (b.attention_mask[row, pad] == 0).all()
        assert (b.labels[row, pad] == IGNORE).all() and (b.input_ids[row, pad] == processor.pad_token_id).all()
    assert torch.equal(b.pixel_values, torch.cat([exs[1].pixel_values, exs[2].pixel_values]))
    assert b.spatial_shapes.tolist() == [[4, 4], [4, 4]]
    assert b.n_targets == sum(int((e.labels[1:] != IGNORE).sum()) for e in exs)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_datasets_folder_without_datasets_package(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="pip install datasets"):
        open_data(tmp_path / "ds")


def test_datasets_folder(processor, tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    from PIL import Image

    img = Image.new("RGB", (64, 64), (220, 20, 20))
    rows = {
        "messages": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}],
        ],
        "images": [[img], []],
    }
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()),
    })
    def save(name: str) -> None:
        # Built from an Arrow table with a fixed fingerprint: no dill hashing of the rows needed.
        table = pa.Table.from_pydict(features.encode_batch(rows), schema=features.arrow_schema)
        datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=name).save_to_disk(
            str(tmp_path / name))

    save("ds")
    src = open_data(tmp_path / "ds")
    assert len(src) == 2
    ex = encode(processor, src.record(0), 512)
    assert ex.spatial_shapes.tolist() == [[4, 4]]
    assert processor.decode(ex.input_ids[ex.labels != IGNORE], skip_special_tokens=False) == "Red.<|im_end|>"
    assert encode(processor, src.record(1), 512).pixel_values is None

    rows["messages"][1] = [{"role": "user", "content": [{"type": "text", "text": "no answer"}]}]
    save("bad")
    with pytest.raises(DataError, match="row 1: no assistant message"):
        open_data(tmp_path / "bad")
