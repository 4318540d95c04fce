"""The bundled model: loads offline by default, answers easy-VQA, equals transformers; its recipe's pieces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lfm2vl
import reference
from lfm2vl.bundled import BUNDLED
from lfm2vl.eval.tasks import easyvqa
from lfm2vl.train import bundled_recipe as recipe

REPO = Path(__file__).resolve().parent.parent


def test_bundled_model_ships_small_and_loads_by_default():
    size = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert size <= 25 * 2**20, f"bundled model is {size / 2**20:.1f} MB"
    model = lfm2vl.load()
    assert model.source == BUNDLED and model.processor is not None


def test_readme_first_command_answers_about_the_example_image():
    readme = (REPO / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("pip install") and "lfm2vl generate" in ln)
    cmd = line.split("&&", 1)[1].strip()
    assert "--model" not in cmd, "the first command must use the bundled model"
    r = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().lower() == "circle"


def test_bundled_answers_easyvqa_and_matches_transformers():
    """50 test questions: our greedy answers == transformers' greedy answers, and mostly right."""
    tf = reference.transformers()
    ours = lfm2vl.load()
    theirs = tf.Lfm2VlForConditionalGeneration.from_pretrained(str(BUNDLED)).eval()
    proc = reference.load_reference_processor(BUNDLED)
    examples = easyvqa.examples("test")[::193][:50]
    assert len(examples) == 50
    ours_answers = [c.text for c in ours.complete([ex.messages for ex in examples], max_new_tokens=6)]
    right = 0
    for ex, mine in zip(examples, ours_answers):
        image = ex.messages[0]["content"][0]["image"]
        text = proc.apply_chat_template(ex.messages, add_generation_prompt=True)
        from PIL import Image

        inputs = proc(text=[text], images=[[Image.open(image)]], return_tensors="pt")
        with torch.no_grad():
            out = theirs.generate(**inputs, max_new_tokens=6, do_sample=False)
        answer = proc.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert mine == answer, (ex.id, mine, answer)
        right += easyvqa.match(mine, ex.answer)
    assert right >= 47, f"only {right}/50 right"  # the model scores 98.85% on the full split


def test_eval_cli_output_format(tmp_path):
    preds = tmp_path / "preds.jsonl"
    r = subprocess.run([sys.executable, "-m", "lfm2vl", "eval", "--task", "easyvqa", "--limit", "300",
                        "--predictions", str(preds)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["task"] == "easyvqa" and summary["n"] == 300 and summary["score"] >= 95  # percent
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 300 and {"id", "prediction", "answer", "score"} <= set(rows[0])
    assert abs(100 * sum(r["score"] for r in rows) / 300 - summary["score"]) < 1e-3
    assert "eval easyvqa" in r.stderr  # the progress bar


@pytest.mark.slow
def test_bundled_full_test_split_accuracy():
    summary = lfm2vl.eval.harness.evaluate(lfm2vl.load(), "easyvqa", batch_size=256, progress=False)
    assert summary["n"] == 9673 and summary["score"] >= 95


def test_image_labels_are_read_off_train_questions():
    qs = ["what color is the shape?", "what is the blue shape?", "is there not a red shape?",
          "does the image contain a circle?", "what shape is present?"]
    ans = ["green", "circle", "no", "no", "triangle"]
    ids = [0, 1, 2, 3, 4]
    labels = recipe.image_labels(qs, ans, ids)
    assert labels == {1: "blue circle"}  # image 0 has no shape, 2 red but no shape, 3 not a circle, 4 no colour
    two = recipe.image_labels(["what color is the shape?", "does the image contain a rectangle?"], ["teal", "yes"], [7, 7])
    assert two == {7: "teal rectangle"}


def test_recipe_stages_and_mixture(tmp_path):
    files = {k: tmp_path / f"{k}.jsonl" for k in ("describe", "vqa", "text", "heldout")}
    cfg = recipe.recipe(tmp_path / "init", files, tmp_path / "out")
    names = [s.name for s in cfg.stages]
    assert names == ["vision", "mid", "sft"]
    mid = cfg.stages[1]
    assert mid.text_data == (str(files["text"]),) and mid.text_share == (0.95, 0.30)
    assert all(str(files["heldout"]) not in s.data for s in cfg.stages)
    assert recipe.model_config(1000, 396).vision.num_patches == 64


def test_stdlib_text_stream_is_available_offline():
    texts = recipe.stdlib_docstrings(max_chars=20_000)
    assert len(texts) > 50 and all(len(t.split()) <= 24 for t in texts)
