"""`lfm2vl train` flags -> TrainConfig, recipes, and a short run through `main` (as the CLI calls it)."""

from __future__ import annotations

import argparse

import pytest
import torch


from lfm2vl.train import Stage, TrainConfig
from lfm2vl.train.command import add_parser, build_config, main




def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lfm2vl")
    add_parser(parser.add_subparsers(dest="command").add_parser)
    return parser.parse_args(["train", *argv])


def test_flags_build_a_one_stage_config():
    args = _parse(["--data", "a.jsonl", "--data", "b", "--text-data", "t.jsonl", "--text-share", "0.9", "0.2",
                   "-o", "out", "--model", "m", "--steps", "7", "--lr", "2e-4", "--vision-lr", "1e-5",
                   "--batch-size", "3", "--grad-accum", "2", "--lora", "--lora-r", "16", "--lora-targets", "q_proj, fc1",
                   "--freeze-vision", "--freeze-projector", "--save-every", "5", "--resume", "--eval-data", "e.jsonl"])
    assert args.func is main
    c = build_config(args)
    assert c.stages == (Stage(data=("a.jsonl", "b"), steps=7, text_data=("t.jsonl",), text_share=(0.9, 0.2), lr=2e-4,
                              vision_lr=1e-5, freeze=("vision_tower", "multi_modal_projector")),)
    assert (c.model, c.output_dir, c.batch_size, c.grad_accum, c.save_every, c.resume) == ("m", "out", 3, 2, 5, True)
    assert c.lora.r == 16 and c.lora.targets == ("q_proj", "fc1") and c.eval_data == ("e.jsonl",)
    assert build_config(_parse(["--data", "a", "-o", "o"])).lora is None


def test_recipe_file(tmp_path):
    recipe = TrainConfig(output_dir="x", stages=(Stage(data=("a",), steps=2, name="mid"), Stage(data=("b",), steps=1)))
    recipe.save(tmp_path / "r.json")
    c = build_config(_parse(["--recipe", str(tmp_path / "r.json"), "-o", "elsewhere", "--resume"]))
    assert c.stages == recipe.stages and c.output_dir == "elsewhere" and c.resume
    with pytest.raises(ValueError, match="either --recipe or --data"):
        build_config(_parse(["--recipe", str(tmp_path / "r.json"), "--data", "a"]))


def test_main_runs_and_reports_errors(tiny_train_ckpt, color_data, tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls only
    try:
        common = ["--model", str(tiny_train_ckpt), "--data", str(color_data), "--steps", "2", "--batch-size", "2",
                  "--no-progress", "--lora", "--lora-r", "2"]
        assert main(_parse([*common, "-o", str(tmp_path / "o")])) == 0
        out = capsys.readouterr().out
        assert "trained 2 steps" in out and "adapter:" in out and (tmp_path / "o" / "model" / "config.json").exists()
        with pytest.raises(ValueError, match="'o_proj'"):
            main(_parse([*common, "--lora-targets", "o_proj", "-o", str(tmp_path / "p")]))
    finally:
        torch.set_num_threads(before)
