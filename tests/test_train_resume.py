"""A run killed with SIGKILL and resumed logs exactly the losses of a run that was never interrupted.

Three fresh interpreters (one thread each, so the numerics match): an uninterrupted run, a run
that SIGKILLs itself two steps after its first checkpoint, and the resumption of that run. The
recipe exercises every piece of state a resume must restore: AdamW moments, the LR schedule
position, data-stream positions of a text/image mixture, and the dropout RNG (LoRA dropout).
"""

from __future__ import annotations

import signal

from test_train_utils import make_text_data, python, run_script, start

from lfm2vl.train import LoraConfig, Stage, TrainConfig
from lfm2vl.train.checkpoint import latest
from lfm2vl.train.metrics import read_metrics

KEYS = ("step", "stage", "loss", "lr", "grad_norm", "targets", "tokens")




def _config(out, ckpt, data, text, resume=False) -> TrainConfig:
    return TrainConfig(
        output_dir=str(out), model=str(ckpt), resume=resume, batch_size=2, grad_accum=2, save_every=3,
        lora=LoraConfig(r=4, alpha=8, dropout=0.1, targets=("language_model.q_proj", "language_model.w1", "fc1")),
        stages=(Stage(data=(str(data),), text_data=(str(text),), steps=8, lr=5e-3, warmup_steps=2),),
        eval_data=(str(data),), eval_every=4, progress=False,
    )


def _losses(path) -> list[tuple]:
    return [tuple(r.get(k) for k in KEYS) if "loss" in r else ("eval", r["step"], r["eval_loss"])
            for r in read_metrics(path)]


def test_sigkill_and_resume_gives_the_same_loss_sequence(tiny_train_ckpt, color_data, tmp_path):
    text = make_text_data(tmp_path)
    script = run_script(tmp_path)
    full, broken = tmp_path / "full", tmp_path / "broken"
    _config(full, tiny_train_ckpt, color_data, text).save(tmp_path / "full.json")
    _config(broken, tiny_train_ckpt, color_data, text).save(tmp_path / "broken.json")
    _config(broken, tiny_train_ckpt, color_data, text, resume=True).save(tmp_path / "resume.json")

    a = start([python(), str(script), "full.json"], tmp_path, "full")
    b = start([python(), str(script), "broken.json", "5"], tmp_path, "broken")  # killed after step 5
    assert a.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    assert b.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "broken.log").read_text()[-3000:]
    assert latest(broken).name == "step_00000003"  # steps 4 and 5 are lost...
    assert [r["step"] for r in read_metrics(broken / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]  # ...but logged

    c = start([python(), str(script), "resume.json"], tmp_path, "resume")
    assert c.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    expected = _losses(full / "metrics.jsonl")
    assert [e[0] for e in expected].count("eval") == 2 and len(expected) == 10
    assert _losses(broken / "metrics.jsonl") == expected  # bit for bit, evaluations included
