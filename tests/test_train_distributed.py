"""Two data-parallel processes (torchrun, gloo) train exactly as one process with the same global batch.

One process runs micro-batches of 4; two processes run micro-batches of 2 each over the same
global batch plan. Losses are normalised by the global target count and gradients summed, so
per-step losses, gradient norms, the held-out loss and the final weights agree to float round-off.
"""

from __future__ import annotations


import pytest
import torch
from test_train_utils import python, run_script, start

import lfm2vl
from lfm2vl.train import Stage, TrainConfig
from lfm2vl.train.metrics import read_metrics




def _config(out, ckpt, data, batch_size: int) -> TrainConfig:
    return TrainConfig(output_dir=str(out), model=str(ckpt), batch_size=batch_size, device="cpu",
                       stages=(Stage(data=(str(data),), steps=3, lr=5e-3),), eval_data=(str(data),), progress=False)


def test_two_processes_match_one(tiny_train_ckpt, color_data, tmp_path):
    script = run_script(tmp_path)
    _config(tmp_path / "one", tiny_train_ckpt, color_data, 4).save(tmp_path / "one.json")
    _config(tmp_path / "two", tiny_train_ckpt, color_data, 2).save(tmp_path / "two.json")
    one = start([python(), str(script), "one.json"], tmp_path, "one")
    two = start([python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(script), "two.json"], tmp_path, "two")
    assert one.wait(timeout=300) == 0, (tmp_path / "one.log").read_text()[-3000:]
    assert two.wait(timeout=300) == 0, (tmp_path / "two.log").read_text()[-3000:]

    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (key, ra, rb)
        if "loss" in ra:
            assert (ra["targets"], ra["tokens"]) == (rb["targets"], rb["tokens"])  # the same global batch
    wa, wb = lfm2vl.load(tmp_path / "one" / "model").module, lfm2vl.load(tmp_path / "two" / "model").module
    for (name, pa), (_, pb) in zip(wa.state_dict().items(), wb.state_dict().items()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)
