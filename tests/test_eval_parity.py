"""Our task scorers against lmms-eval 0.7.3's (tests/lmms_reference.py imports its task utils): on the same
documents and predictions, every per-sample score and every aggregate is the same. The predictions are
the tricky cases of the published rules: answers inside sentences, letters in parentheses, "The answer is
(B)", yes/no with punctuation and case, ANLS around its 0.5 threshold, MME's per-image pairs, MathVista's
precision and list answers, OCRBench's full-width characters and handwritten formulas."""

import pytest

import lmms_reference as lmms
from lfm2vl.eval import mcq
from lfm2vl.eval.tasks import blink, infovqa, mathvista, mme, mmmu, mmstar, mmvet, ocrbench, realworldqa, seedbench

MCQ_PREDICTIONS = [
    "B", "b", "(B)", "B.", "B) cat", "The answer is (B).", "The answer is B", "I think the answer is C because the cat",
    "Answer: D", "A. a cat", "Option (A) is wrong, so (C)", "", "   ", "None of them", "It is a dog.", "CD", "B, C",
    "The correct answer is D. The dog", "**B**", "(A) or (B)", "Between A and C, I pick A", "A\nExplanation: B is wrong",
]


def _records(task, rows, preds):
    samples = task.samples(rows, [[] for _ in rows], [str(r.get("index", n)) for n, r in enumerate(rows)])
    return [{**s.ref, "id": s.id, "prediction": p} for s, p in zip(samples, preds)]


def _score_all(task, records):
    for r in records:
        r["score"] = task.score(r)
    return records


def test_extract_mcq_answer_matches():
    ref = lmms.mcq_extract().extract_mcq_answer
    for p in MCQ_PREDICTIONS:
        for choices in (["A", "B", "C", "D"], None):
            assert mcq.extract_letter(p, choices) == ref(p, choices=choices), p


def test_mmstar_per_sample_and_aggregate():
    up = lmms.task_utils("mmstar")
    cats = [("coarse perception", "image emotion"), ("coarse perception", "image style & quality"),
            ("math", "geometry"), ("math", "statistical reasoning"), ("logical reasoning", "diagram reasoning")]
    rows, preds = [], []
    for n, p in enumerate(MCQ_PREDICTIONS * 2):
        c, l2 = cats[n % len(cats)]
        rows.append({"index": n, "question": "Which? Options: A: cat, B: dog, C: fox, D: owl", "answer": "ABCD"[n % 4],
                     "category": c, "l2_category": l2})
        preds.append(p)
    ours = _score_all(mmstar, _records(mmstar, rows, preds))
    theirs = [up.mmstar_process_results(r, [p]) for r, p in zip(rows, preds)]
    assert [o["score"] for o in ours] == [t["average"]["score"] for t in theirs]
    summary = mmstar.aggregate(ours)
    assert summary["score"] == pytest.approx(100 * up.mmstar_aggregate_results([t["average"] for t in theirs]))
    for cat in {c for c, _ in cats}:
        theirs_cat = up.mmstar_aggregate_results([t[cat] for t in theirs if cat in t])
        assert summary["categories"][cat] == pytest.approx(100 * theirs_cat, abs=1e-4)


def test_seedbench():
    up = lmms.task_utils("seedbench")
    preds = MCQ_PREDICTIONS + ["  c  ", "D\n", "d."]
    rows = [{"index": n, "question_id": n, "question": "q", "choice_a": "a", "choice_b": "b", "choice_c": "c",
             "choice_d": "d", "answer": "ABCD"[n % 4], "data_type": "image"} for n in range(len(preds))]
    ours = _score_all(seedbench, _records(seedbench, rows, preds))
    theirs = [up.seed_process_result(r, [p])["seed_all"] for r, p in zip(rows, preds)]
    assert [o["score"] for o in ours] == [float(up.seed_aggregation_result([t])) for t in theirs]
    assert seedbench.aggregate(ours)["score"] == pytest.approx(100 * up.seed_aggregation_result(theirs))
    assert seedbench.prompt(rows[0]) == up.seed_doc_to_text(rows[0])


def test_blink_letters_limited_to_the_rows_options():
    up = lmms.task_utils("blink")
    preds = MCQ_PREDICTIONS + ["E", "(C)", "The answer: (b)", "answers are C", "D is right"]
    rows = [{"index": n, "idx": n, "sub_task": "Counting", "answer": "(" + "ABC"[n % 3] + ")",
             "choices": ["x", "y", "z"] if n % 2 else ["x", "y", "z", "w"], "prompt": "How many?"}
            for n in range(len(preds))]
    ours = _score_all(blink, _records(blink, rows, preds))
    theirs = [up.blink_process_results(r, [p])["blink_acc"] for r, p in zip(rows, preds)]
    assert [o["score"] for o in ours] == [float(t["is_correct"]) for t in theirs]
    assert blink.aggregate(ours)["score"] == pytest.approx(100 * up.blink_aggregate_results(theirs))
    kwargs = {"pre_prompt": blink.PRE_PROMPT}
    assert blink.prompt(rows[1])[0] == up.blink_doc_to_text(rows[1], kwargs)


def test_realworldqa_letters_and_open_answers():
    up = lmms.task_utils("realworldqa")
    preds = MCQ_PREDICTIONS + ["3", "3.", "Three", "downhill", "Downhill.", " 2 "]
    answers = ["A", "B", "C", "D", "3", "Downhill"]
    rows = [{"index": n, "question": "q", "answer": answers[n % len(answers)]} for n in range(len(preds))]
    ours = _score_all(realworldqa, _records(realworldqa, rows, preds))
    theirs = [up.realworldqa_process_results(r, [p])["exact_match"] for r, p in zip(rows, preds)]
    assert [o["score"] for o in ours] == theirs


def test_mmmu_choice_and_open_questions(monkeypatch):
    up = lmms.task_utils("mmmu")
    # upstream picks a random letter when it finds none; mark those draws to compare the rest exactly
    monkeypatch.setattr(lmms.mcq_mmmu().random, "choice", lambda choices: "?")
    mc = MCQ_PREDICTIONS[:11] + ["The cat sat on the mat and it was a dog", "I would say the fox is the answer here"]
    open_cases = [("2.5", "The answer is 2.50"), ("2.5", "so x = 2.499"), ("1,000", "It is 1000 dollars."),
                  ("Paris", "The capital is paris."), ("a", "The option a is it"), ("['24/7', '3.429']", "3.429"),
                  ("12", "Therefore the final answer is 12"), ("12", "12 or 13"), ("-3", "x = -3"), ("5", "five")]
    rows, preds = [], []
    for n, p in enumerate(mc):
        rows.append({"id": f"validation_Art_{n}", "question": "<image 1> Which?", "question_type": "multiple-choice",
                     "options": "['cat', 'dog', 'fox', 'owl']", "answer": "ABCD"[n % 4]})
        preds.append(p)
    for n, (ans, p) in enumerate(open_cases):
        rows.append({"id": f"validation_Math_{n}", "question": "How much?", "question_type": "open", "options": "[]",
                     "answer": ans})
        preds.append(p)
    ours = _score_all(mmmu, _records(mmmu, rows, preds))
    theirs = [up.mmmu_process_results(r, [p])["mmmu_acc"] for r, p in zip(rows, preds)]
    drawn = [t["parsed_pred"] == ["?"] for t in theirs]
    assert drawn[1] and drawn[4]  # "b", "B) cat": no letter by MMMU's rules; ours draws one, seeded by the id
    for o, t, d in zip(ours, theirs, drawn):
        if d:
            o["score"] = float(mmmu.mmmu_letter(o["prediction"], {"A": "", "B": "", "C": "", "D": ""}, o["id"]) == o["answer"])
            t["parsed_pred"] = [mmmu.mmmu_letter(o["prediction"], {"A": "", "B": "", "C": "", "D": ""}, o["id"])]
    theirs_correct = [float(up.evaluate_mmmu([t])[1]["acc"]) for t in theirs]
    assert [o["score"] for o in ours] == theirs_correct
    assert mmmu.aggregate(ours)["score"] == pytest.approx(100 * up.mmmu_aggregate_results(theirs), abs=1e-3)  # upstream rounds to 5 places
    kwargs = {"prompt_type": "format", "multiple_choice_prompt": mmmu.MC_PROMPT, "open_ended_prompt": mmmu.OPEN_PROMPT}
    samples = mmmu.samples(rows, [[] for _ in rows], [r["id"] for r in rows])
    assert samples[0].messages[0]["content"][-1]["text"] == up.mmmu_doc_to_text(rows[0], kwargs)
    assert samples[-1].messages[0]["content"][-1]["text"] == up.mmmu_doc_to_text(rows[-1], kwargs)


def test_mmmu_without_a_letter_is_seeded_not_random():
    rec = {"id": "validation_Art_1", "question_type": "multiple-choice", "options": ["cat", "dog"], "answer": "A",
           "prediction": "no idea"}
    assert len({mmmu.score(dict(rec)) for _ in range(20)}) == 1


def test_mme_yes_no_and_pairs():
    up = lmms.task_utils("mme")
    preds = ["Yes", "yes.", "YES", "No", "no.", "Y", "n", "Yes, there is", "No, there isn't", "Nope", "yeah", "It is yes",
             "", "not sure", "No.", "Yes"]
    cats = ["existence", "count", "OCR", "code_reasoning", "numerical_calculation"]
    rows = []
    for n, _ in enumerate(preds):
        pair = n // 2
        rows.append({"index": n, "question_id": f"{cats[pair % len(cats)]}/{pair}.png", "category": cats[pair % len(cats)],
                     "question": "Is there a dog? Please answer yes or no.", "answer": "Yes" if n % 2 == 0 else "No"})
    ours = _score_all(mme, _records(mme, rows, preds))
    theirs = [up.mme_process_results(r, [p]) for r, p in zip(rows, preds)]
    flat = [next(iter(t.values())) for t in theirs]
    assert [o["score"] for o in ours] == [f["score"] for f in flat]
    summary = mme.aggregate(ours)
    perception = up.mme_aggregate_results([t["mme_perception_score"] for t in theirs if "mme_perception_score" in t])
    cognition = up.mme_aggregate_results([t["mme_cognition_score"] for t in theirs if "mme_cognition_score" in t])
    assert summary["perception"] == pytest.approx(perception)
    assert summary["cognition"] == pytest.approx(cognition)
    assert summary["score"] == pytest.approx(perception + cognition)
    assert mme.prompt(rows[0]) == up.mme_doc_to_text(rows[0], {"pre_prompt": "", "post_prompt": mme.POST_PROMPT})


def test_ocrbench_counts():
    up = lmms.task_utils("ocrbench")
    cases = [("Regular Text Recognition", "CoCa", "coca"), ("Regular Text Recognition", "CoCa", "It says COCA-cola"),
             ("Digit String Recognition", "１２３", "123"), ("Scene Text-centric VQA", ["stop", "halt"], "A HALT sign"),
             ("Doc-oriented VQA", "a\nb", "A B"), ("Key Information Extraction", "12.5", "12,5"),
             ("Handwritten Mathematical Expression Recognition", "x ^ { 2 }", "x^{2}"),
             ("Handwritten Mathematical Expression Recognition", "X^{2}", "x^{2}"),
             ("Irregular Text Recognition", "ｈｅｌｌｏ\u3000world", "hello world")]
    rows, preds = [], []
    for n, (cat, ans, pred) in enumerate(cases):
        dataset = "HME100k" if cat.startswith("Handwritten") else "IIIT5K"
        rows.append({"index": n, "question": "What is written?", "answer": ans, "question_type": cat, "dataset": dataset})
        preds.append(pred)
    ours = _score_all(ocrbench, _records(ocrbench, rows, preds))
    theirs = [up.ocrbench_process_results(r, [p])["ocrbench_accuracy"] for r, p in zip(rows, preds)]
    assert [o["score"] for o in ours] == [t["score"] for t in theirs]
    for k in up.OCRBench_score:
        up.OCRBench_score[k] = 0
    up.generate_submission_file = lambda name, args, subpath=None: "/dev/null"
    total = up.ocrbench_aggregate_accuracy(theirs, None) * 1000
    summary = ocrbench.aggregate(ours)
    assert summary["score"] == pytest.approx(total)
    assert summary["categories"] == {k: v for k, v in up.OCRBench_score.items() if k in summary["categories"]}


def test_infovqa_anls_thresholds():
    anls = lmms.metrics_functions("anls", "levenshtein_distance")["anls"]
    cases = [(["Paris"], "paris"), (["Paris"], "Pari"), (["Paris"], "Parxx"), (["Paris"], "Pxxxx"), (["abcd"], "abxx"),
             (["abcd"], "abcx"), (["New  York"], "new york"), (["10", "ten"], "Ten"), ([" 42 "], "42"), (["a"], ""),
             (["machine learning"], "machine learnin"), (["yes"], "Yes, it is")]
    for refs, pred in cases:
        assert infovqa.anls(refs, pred) == pytest.approx(anls(refs, [pred])["anls"]), (refs, pred)


def test_mathvista_extraction_and_normalisation():
    up = lmms.task_utils("mathvista")
    ev = up.mathvista_evaluator
    # (question_type, answer_type, choices, precision, answer, extraction the quick paths / rules give)
    cases = [("multi_choice", "text", ["3/11", "8/11", "6/11"], 0, "8/11", "8/11"),
             ("multi_choice", "text", ["3/11", "8/11", "6/11"], 0, "8/11", "B"),
             ("multi_choice", "text", ["3/11", "8/11", "6/11"], 0, "8/11", "(B) 8/11"),
             ("multi_choice", "text", ["red", "blue"], 0, "blue", "bleu"),
             ("free_form", "integer", [], 0, "14", "14"), ("free_form", "integer", [], 0, "14", "14.0"),
             ("free_form", "integer", [], 0, "14", "x"), ("free_form", "float", [], 1, "0.6", "0.6"),
             ("free_form", "float", [], 1, "0.6", "0.63"), ("free_form", "float", [], 2, "1.45", "1.449"),
             ("free_form", "float", [], 2, "1.45", "1.4"), ("free_form", "list", [], 0, "[2007, 2008]", "[2007, 2008]"),
             ("free_form", "list", [], 0, "[2007, 2008]", "[2007,2008]")]
    for qt, at, choices, precision, answer, extraction in cases:
        ref = {"question_type": qt, "answer_type": at, "choices": choices, "precision": precision}
        ours = mathvista.normalize(extraction, ref)
        theirs = ev.normalize_extracted_answer(extraction, choices, qt, at, precision)
        assert ours == theirs, (extraction, ours, theirs)
        assert (str(ours).strip() == answer) == ev.safe_equal(theirs, answer)


def test_mathvista_quick_paths_equal_lmms_without_its_llm():
    """Predictions upstream extracts without asking its LLM: per-sample scores are equal."""
    up = lmms.task_utils("mathvista")
    rows = [{"pid": str(n), "question": "q", "query": "q", "question_type": qt, "answer_type": at, "choices": ch,
             "precision": pr, "answer": ans, "metadata": {"split": "testmini"}}
            for n, (qt, at, ch, pr, ans) in enumerate([
                ("multi_choice", "text", ["3/11", "8/11"], None, "8/11"), ("free_form", "integer", None, None, "14"),
                ("free_form", "integer", None, None, "14"), ("free_form", "float", None, 1, "0.6"),
                ("free_form", "float", None, 2, "1.45"), ("multi_choice", "text", ["3/11", "8/11"], None, "8/11")])]
    preds = ["8/11", "14", "15", "0.6", "1.45", "3/11"]
    lmms.FakeServer.replies = staticmethod(lambda prompt: pytest.fail("the quick paths must not ask the LLM"))
    ours = _score_all(mathvista, _records(mathvista, [{**r, "choices": r["choices"] or []} for r in rows], preds))
    theirs = [up.mathvista_process_results(r, [p])["submission"]["true_false"] for r, p in zip(rows, preds)]
    assert [o["score"] for o in ours] == [float(t) for t in theirs]


def test_mmvet_judge_reply_parsing_matches():
    """Same judge replies -> same scores (the judge is a stub on both sides)."""
    up = lmms.task_utils("mmvet")
    replies = {"q1": "0.7", "q2": "1.0 because it is right", "q3": "0.0", "q4": "0.3"}
    rows = [{"index": n, "question_id": f"v{n}", "question": q, "answer": "cat<AND>dog", "capability": "rec,know"}
            for n, q in enumerate(replies)]
    preds = ["a cat and a dog", "a dog", "nothing", "a cat"]

    def reply(prompt):
        return next(v for k, v in replies.items() if f"\n{k} |" in prompt)

    lmms.FakeServer.replies = staticmethod(reply)

    class Judge:
        model = "stub"

        def complete(self, messages, **params):
            return reply(messages[-1]["content"])

    records = _records(mmvet, rows, preds)
    ours = [mmvet.score(r, Judge())[0] for r in records]
    theirs = [up.mmvet_process_results(r, [p])["gpt_eval_score"] for r, p in zip(rows, preds)]
    assert ours == [t["score"] for t in theirs]
    assert mmvet.judge_prompt(records[0]) == (f"{up.MM_VET_PROMPT}\nq1 | cat <AND> dog | a cat and a dog |")
    for r, s in zip(records, ours):
        r["score"] = s
    assert mmvet.aggregate(records)["score"] == pytest.approx(up.mmvet_aggregate_results(theirs))
