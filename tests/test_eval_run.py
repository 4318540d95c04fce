"""`lfm2vl eval` end to end with the bundled model, as a user runs it: small generated benchmark files,
the printed table and the JSON last line, resume after a real SIGKILL, `--endpoint` against a real
`lfm2vl serve` process (same predictions as in-process), and the LLM-judge path against a fake
OpenAI-compatible judge (stdlib http.server) that returns fixed grades."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_eval_data import CIRCLE, TRIANGLE, write_tsv

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "LFM2VL_DEBUG": "", "LFM2VL_API_KEY": "", "OPENAI_API_KEY": ""}


def _eval(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lfm2vl", "eval", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _summary(r):
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _preds(folder):
    return {(row := json.loads(line))["id"]: row for line in (Path(folder) / "predictions.jsonl").read_text().splitlines()}


def _without_timing(s):
    return {k: v for k, v in s.items() if k not in ("seconds", "questions_per_s", "generated")}


def _mcq_tsv(path):
    import base64

    b64 = {p: base64.b64encode(p.read_bytes()).decode() for p in (CIRCLE, TRIANGLE)}
    lines = ["index\timage\tquestion\tA\tB\tC\tD\tanswer\tcategory"]
    for n, (img, q, ans) in enumerate([(CIRCLE, "what shape is in the image?", "A"),
                                       (CIRCLE, "what color is the shape?", "B"),
                                       (TRIANGLE, "what shape is in the image?", "C"),
                                       (TRIANGLE, "what color is the shape?", "D")]):
        cell = b64[img] if n % 2 == 0 else str(n - 1)
        lines.append(f"{n}\t{cell}\t{q}\tcircle\tred\ttriangle\tblue\t{ans}\t{'shape' if n % 2 == 0 else 'color'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return {"mme": write_tsv(d / "mme.tsv"), "seed": _mcq_tsv(d / "seed.tsv"), "dir": d}


@pytest.fixture(scope="module")
def local_runs(files):
    out = {}
    for task, key in (("mme", "mme"), ("seedbench", "seed")):
        r = _eval("--task", task, "--data", files[key], "--out", files["dir"] / f"local-{task}")
        out[task] = (_summary(r), r)
    return out


def test_cli_prints_table_and_summary_and_writes_files(files, local_runs):
    summary, r = local_runs["mme"]
    assert summary["task"] == "mme" and summary["n"] == 6 and summary["errors"] == 0
    preds = _preds(files["dir"] / "local-mme")
    assert len(preds) == 6 and all(p["prediction"] for p in preds.values())
    # the summary is the official aggregate of the written predictions (recomputed here from the file)
    pairs = {}
    for p in preds.values():
        pairs.setdefault((p["category"], p["pair"]), []).append(p["score"])
    cats = {}
    for (cat, _), s in pairs.items():
        cats.setdefault(cat, []).append(100 * sum(s) / 2 + 100 * (sum(s) == 2))
    assert summary["score"] == pytest.approx(sum(sum(v) / len(v) for v in cats.values()), abs=1e-3)
    assert "task / category" in r.stdout and "eval mme" in r.stderr
    assert json.loads((files["dir"] / "local-mme/summary.json").read_text()) == summary
    seed, _ = local_runs["seedbench"]
    assert seed["n"] == 4 and 0 <= seed["score"] <= 100


def test_killed_run_resumes_to_the_same_summary(tmp_path):
    full = _summary(_eval("--task", "easyvqa", "--limit", 500, "--out", tmp_path / "full"))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lfm2vl", "eval", "--task", "easyvqa", "--limit", "500", "--out",
                             str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    preds = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not preds.exists() or len(preds.read_text().splitlines()) < 100):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(preds.read_text().splitlines())
    assert 100 <= written < 500, written  # killed part-way
    r = _eval("--task", "easyvqa", "--limit", 500, "--out", out)
    resumed = _summary(r)
    assert resumed["generated"] == 500 - len(_preds_ids(preds, before=written))
    assert _without_timing(resumed) == _without_timing(full)
    assert sorted(_preds(out)) == sorted(_preds(tmp_path / "full"))
    assert {k: v["prediction"] for k, v in _preds(out).items()} == {k: v["prediction"] for k, v in _preds(tmp_path / "full").items()}


def _preds_ids(path, before):
    ids = set()
    for line in path.read_text().splitlines()[:before]:
        try:
            ids.add(json.loads(line)["id"])
        except json.JSONDecodeError:
            pass
    return ids


def test_endpoint_gives_the_in_process_predictions(files, local_runs):
    from test_server import _serve

    with _serve() as (base, _):
        for task, key in (("mme", "mme"), ("seedbench", "seed")):
            out = files["dir"] / f"remote-{task}"
            remote = _summary(_eval("--task", task, "--data", files[key], "--endpoint", f"{base}/v1", "--concurrency", 3,
                                    "--out", out))
            local = local_runs[task][0]
            assert {k: v["prediction"] for k, v in _preds(out).items()} == \
                {k: v["prediction"] for k, v in _preds(files["dir"] / f"local-{task}").items()}
            assert remote["score"] == local["score"] and remote["model"].startswith(f"{base}/v1 (lfm2vl)")


class _Judge(BaseHTTPRequestHandler):
    grades = {"circle": "1.0", "triangle": "0.4"}
    seen: list = []

    def log_message(self, *a):
        pass

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        _Judge.seen.append(body)
        grade = next(v for k, v in self.grades.items() if f"| {k} |" in prompt.rsplit("\n", 1)[-1])
        self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": grade}}]})


@pytest.fixture
def judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Judge.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _mmvet(path):
    rows = [{"index": f"v{n}", "image": str(img), "question": "what shape is in the image?", "answer": ans,
             "capability": cap} for n, (img, ans, cap) in enumerate([(CIRCLE, "circle", "rec"), (TRIANGLE, "triangle", "rec,spat")])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_judged_task_needs_a_judge_then_scores_with_it(tmp_path, judge):
    data = _mmvet(tmp_path / "mmvet.jsonl")
    r = _eval("--task", "mmvet", "--data", data)
    assert r.returncode == 2 and r.stdout == ""
    assert "--judge-endpoint" in r.stderr and "--score-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # generate now, score later with the judge
    out = tmp_path / "o"
    assert _eval("--task", "mmvet", "--data", data, "--generate-only", "--out", out, "--max-new-tokens", 8).returncode == 0
    s = _summary(_eval("--task", "mmvet", "--data", data, "--score-only", "--out", out, "--judge-endpoint", judge))
    assert s["n"] == 2 and s["score"] == pytest.approx(70.0)  # the fake judge: 1.0 and 0.4
    assert s["categories"] == {"rec": 70.0, "spat": 40.0}
    assert {b["model"] for b in _Judge.seen} == {"fake-judge"} and all(b["temperature"] == 0.0 for b in _Judge.seen)
    judged = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert sorted(j["score"] for j in judged) == [0.4, 1.0]
    # scoring again reads the judgments file: the judge is not asked again
    n = len(_Judge.seen)
    assert _summary(_eval("--task", "mmvet", "--data", data, "--score-only", "--out", out, "--judge-endpoint",
                          judge))["score"] == s["score"]
    assert len(_Judge.seen) == n


@pytest.mark.parametrize("args, message", [
    (("--task", "mmstar"), "--task mmstar needs --data FILE"),
    (("--task", "mme", "--data", "nope.tsv"), "--data nope.tsv: no such file"),
    (("--task", "mme", "--score-only"), "--score-only needs the predictions"),
    (("--task", "mme", "--endpoint", "http://127.0.0.1:9/v1", "--model", "x"), "--endpoint evaluates the server's model"),
    (("--task", "easyvqa", "--generate-only", "--out", "x"), "--generate-only is for judged tasks"),
])
def test_usage_errors_are_one_line_before_loading(args, message):
    r = _eval(*args, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_column_is_a_usage_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"index": 0, "image": str(CIRCLE), "question": "q?"}) + "\n")
    r = _eval("--task", "mme", "--data", path, timeout=60)
    assert r.returncode == 2 and "missing column(s) answer, category" in r.stderr
