"""Benchmark files in each layout (VLMEvalKit TSV with base64 images and index references, JSONL with paths,
parquet and a datasets.save_to_disk folder with image structs) give the same samples; scoring on generated
data gives exact summaries; resume, score-only and missing-column errors. A scripted backend stands in for
the model here (tests/test_eval_run.py runs the real one)."""

import base64
import csv
import json
from pathlib import Path

import pytest

from lfm2vl.eval import harness
from lfm2vl.eval.data import DataError, read_rows

ROOT = Path(__file__).parent.parent
CIRCLE, TRIANGLE = ROOT / "examples/red_circle.png", ROOT / "examples/blue_triangle.png"

# MME-shaped rows: two questions per image; the second row of each pair refers to the first's image by index
QUESTIONS = [("existence", CIRCLE, "Is there a circle in the image? Please answer yes or no.", "Yes"),
             ("existence", CIRCLE, "Is there a triangle in the image? Please answer yes or no.", "No"),
             ("existence", TRIANGLE, "Is there a triangle in the image? Please answer yes or no.", "Yes"),
             ("existence", TRIANGLE, "Is there a circle in the image? Please answer yes or no.", "No"),
             ("code_reasoning", CIRCLE, "Is the shape red? Please answer yes or no.", "Yes"),
             ("code_reasoning", CIRCLE, "Is the shape blue? Please answer yes or no.", "No")]


class Scripted:
    """A backend that answers from a table (question text -> answer) and records what it was asked."""

    name = "scripted"

    def __init__(self, answers, stop_after=None):
        self.answers, self.asked, self.stop_after = answers, [], stop_after

    def run(self, samples, max_new_tokens, done):
        for s in samples:
            if self.stop_after is not None and len(self.asked) >= self.stop_after:
                raise KeyboardInterrupt  # a run interrupted mid-way
            text = s.messages[0]["content"][-1]["text"]
            images = [p["image"] for p in s.messages[0]["content"] if p["type"] == "image"]
            self.asked.append((s.id, text, images))
            done(s, next(v for k, v in self.answers.items() if k in text), None)


ANSWERS = {"circle in the image?\nAnswer": "yes", "triangle in the image?\nAnswer": "No.", "red?": "Yes, it is",
           "blue?": "yes"}


def _b64(path):
    return base64.b64encode(path.read_bytes()).decode()


def write_tsv(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "answer", "category", "image_path"])
        first = {}
        for n, (cat, img, q, a) in enumerate(QUESTIONS):
            key = (cat, img)
            cell = str(first[key]) if key in first else _b64(img)
            first.setdefault(key, n)
            w.writerow([n, cell, q, a, cat, f"{cat}/{img.stem}.png"])
    return path


def write_jsonl(path):
    with open(path, "w") as f:
        for n, (cat, img, q, a) in enumerate(QUESTIONS):
            f.write(json.dumps({"index": n, "image": str(img), "question": q, "answer": a, "category": cat,
                                "question_id": f"{cat}/{img.stem}.png"}) + "\n")
    return path


def _table():
    pa = pytest.importorskip("pyarrow")
    return pa.table({"question_id": [f"{c}/{i.stem}.png" for c, i, _, _ in QUESTIONS],
                     "image": [{"bytes": i.read_bytes(), "path": None} for _, i, _, _ in QUESTIONS],
                     "question": [q for _, _, q, _ in QUESTIONS], "answer": [a for *_, a in QUESTIONS],
                     "category": [c for c, *_ in QUESTIONS]})


def write_parquet(path):
    import pyarrow.parquet as pq

    pq.write_table(_table(), path)
    return path


def write_arrow_folder(path):
    import pyarrow as pa

    path.mkdir()
    table = _table()
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (path / "dataset_info.json").write_text("{}")
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return path


WRITERS = {"data.tsv": write_tsv, "data.jsonl": write_jsonl, "data.parquet": write_parquet, "hf_folder": write_arrow_folder}

# existence: the circle's pair both right (acc 100 + acc+ 100), the triangle's both wrong (0); code_reasoning:
# one of two right (acc 50 + acc+ 0)
EXPECTED = {"existence": (200 + 0) / 2, "code_reasoning": 50.0}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_layout_gives_the_same_mme_summary(tmp_path, name):
    data = WRITERS[name](tmp_path / name)
    backend = Scripted(ANSWERS)
    summary = harness.evaluate(task="mme", data=data, backend=backend, out=tmp_path / "out", progress=False)
    assert summary["n"] == 6 and summary["errors"] == 0
    assert summary["categories"] == EXPECTED
    assert summary["perception"] == 100.0 and summary["cognition"] == 50.0 and summary["score"] == 150.0
    # the official prompt, and every row got its own image back (the TSV's references resolved)
    assert backend.asked[0][1] == "Is there a circle in the image?\nAnswer the question using a single word or phrase."
    circle = CIRCLE.read_bytes()
    for (_, _, images), (_, img, _, _) in zip(sorted(backend.asked, key=lambda a: int(a[0]) if a[0].isdigit() else 0),
                                              QUESTIONS):
        (src,) = images
        got = base64.b64decode(src.split(",", 1)[1]) if src.startswith("data:") else Path(src).read_bytes()
        assert (got == circle) == (img == CIRCLE)
    rows = [json.loads(line) for line in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all({"id", "prediction", "answer", "score"} <= set(r) for r in rows)
    assert json.loads((tmp_path / "out/summary.json").read_text()) == summary


def test_tsv_image_reference_rows_share_the_first_rows_image(tmp_path):
    from lfm2vl.eval.data import images

    rows = read_rows(write_tsv(tmp_path / "d.tsv"))
    assert rows[1]["image"] == "0" and len(rows[0]["image"]) > 256
    imgs = images(rows, tmp_path)
    assert imgs[1][0].source == imgs[0][0].source and imgs[1][0].key == imgs[0][0].key
    assert imgs[0][0].source.startswith("data:image/png;base64,")


def test_interrupted_run_resumes_to_the_same_summary(tmp_path):
    data = write_tsv(tmp_path / "d.tsv")
    full = harness.evaluate(task="mme", data=data, backend=Scripted(ANSWERS), out=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(task="mme", data=data, backend=Scripted(ANSWERS, stop_after=4), out=tmp_path / "b",
                         progress=False)
    with open(tmp_path / "b/predictions.jsonl", "a") as f:
        f.write('{"id": "5", "predic')  # a line torn by the kill
    second = Scripted(ANSWERS)
    resumed = harness.evaluate(task="mme", data=data, backend=second, out=tmp_path / "b", progress=False)
    assert len(second.asked) == 2  # only what was missing
    drop = set(harness.TIMING)
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}
    lines = (tmp_path / "b/predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == [str(i) for i in range(6)]
    scored = harness.evaluate(task="mme", data=data, out=tmp_path / "b", score_only=True, progress=False)
    assert scored["score"] == full["score"] and scored["generated"] == 0


def test_score_only_refuses_missing_predictions(tmp_path):
    data = write_tsv(tmp_path / "d.tsv")
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(task="mme", data=data, backend=Scripted(ANSWERS, stop_after=3), out=tmp_path / "o",
                         progress=False)
    with pytest.raises(DataError, match="no prediction for 3 of 6"):
        harness.evaluate(task="mme", data=data, out=tmp_path / "o", score_only=True, progress=False)


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"index": 0, "image": str(CIRCLE), "question": "q?", "category": "x"}) + "\n")
    with pytest.raises(DataError, match=r"missing column\(s\) answer \(the file has: category, image, index, question\)"):
        harness.plan("seedbench", path)
    with pytest.raises(DataError, match="needs --data"):
        harness.plan("mmstar", None)


def test_seedbench_tsv_exact_accuracy(tmp_path):
    path = tmp_path / "seed.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "A", "B", "C", "D", "answer", "category"])
        for n in range(4):
            w.writerow([n, _b64(CIRCLE) if n == 0 else "0", f"q{n}", "circle", "square", "star", "line", "A",
                        "Scene" if n < 2 else "Count"])
    answers = {"q0": "A", "q1": "a. circle", "q2": "B", "q3": "(A)"}
    backend = Scripted(answers)
    s = harness.evaluate(task="seedbench", data=path, backend=backend, progress=False)
    assert s["score"] == 50.0 and s["categories"] == {"Count": 0.0, "Scene": 100.0}  # "(A)": first char "("
    assert backend.asked[0][1] == ("q0\nA. circle\nB. square\nC. star\nD. line\n"
                                   "Answer with the option's letter from the given choices directly.")


def test_missing_pyarrow_names_the_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_rows(tmp_path / "d.parquet")


class _ScriptedJudge:
    """Grades by the kind of prompt it gets, and records the prompts."""

    model = "scripted-judge"

    def __init__(self):
        self.prompts = []

    def complete(self, messages, **params):
        content = messages[-1]["content"]
        text = content if isinstance(content, str) else content[0]["text"]
        self.prompts.append((text, content if not isinstance(content, str) else None))
        if "Ground Truth List" in text:
            return "right" if "cat" in text.split("Response from the model:")[1].split("\n")[0] else "wrong"
        if "<start of constraint list>" in text:
            return "Judgement: fine.\nSummary: Score of constraint_1: 1/1, Score of constraint_2: 0/1."
        return 'Reasoning: differs.\nSummary: "True"'


def test_mmifeval_levels_rules_and_aux_rows(tmp_path):
    constraints = [{"key": "tone", "value": "be formal", "judge": {"method": "direct_gpt"}},
                   {"key": "length", "value": "2 paragraphs", "judge": {"method": "direct_gpt"}},
                   {"key": "words", "value": "at most 5 words", "judge": {"method": "rule_based", "verify_funcs": [
                       {"func": "check_whether_response_word_count_in_range", "params": [1, 5]}]}},
                   {"key": "end", "value": "end with 'Done.'", "judge": {"method": "rule_based", "verify_funcs": [
                       {"func": "check_whether_whole_response_end_with_certain_substring", "params": ["Done."]}]}},
                   {"key": "style", "value": "use a metaphor", "judge": {"method": "cmp_gpt"}}]
    rows = [{"index": 0, "id": "p1", "image": str(CIRCLE), "question": "What animal?", "tag": "P-Level",
             "answer": json.dumps(["cat"]), "infer_type": "main"},
            {"index": 1, "id": "p2", "image": str(CIRCLE), "question": "Which animal?", "tag": "P-Level",
             "answer": json.dumps(["cat"]), "infer_type": "main"},
            {"index": 2, "id": "c1", "image": str(TRIANGLE), "question": "Describe it formally.", "tag": "C-Level",
             "constraints": json.dumps(constraints), "infer_type": "main"},
            {"index": 3, "id": "c1", "image": str(TRIANGLE), "question": "Describe it.", "tag": "C-Level",
             "constraints": json.dumps(constraints), "infer_type": "aux_cmp_gpt", "del_cons": "style"}]
    path = tmp_path / "mmif.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {"What animal?": "A cat.", "Which animal?": "A dog.", "formally": "A triangle it is. Done.",
               "Describe it.": "triangle"}
    judge = _ScriptedJudge()
    s = harness.evaluate(task="mmifeval", data=path, backend=Scripted(answers), judge=judge, out=tmp_path / "o",
                         progress=False)
    # P-Level: right, wrong; C-Level: direct 1 + 0, words 1 (5 words), end 1, cmp 1 -> 4/5
    assert s["n"] == 3 and s["categories"] == {"P-Level": 50.0, "C-Level": 80.0}
    assert s["score"] == pytest.approx(100 * (1 + 0 + 0.8) / 3, abs=1e-4)
    c_prompt = next(p for p in judge.prompts if "<start of constraint list>" in p[0])
    assert "Constraint_1: be formal\nConstraint_2: 2 paragraphs" in c_prompt[0]
    assert c_prompt[1][1]["image_url"]["url"].startswith("data:image/png;base64,")  # the judge sees the image
    cmp = next(p for p in judge.prompts if "<start of constraint>" in p[0])[0]
    assert "under the constraint>\nA triangle it is. Done.\n" in cmp and "without the constraint>\ntriangle\n" in cmp
