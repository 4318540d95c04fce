"""The training loop in-process: a tiny overfit, LoRA outputs, stages with freezing, mixture and aux loss."""

from __future__ import annotations


import pytest
import torch
from PIL import Image
from test_train_utils import make_text_data

import lfm2vl
from lfm2vl.train import LoraConfig, Stage, TrainConfig, load_adapter, run
from lfm2vl.train.metrics import read_metrics




@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes
    # them several times slower; restore the session's setting afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def aux_penalty(module: torch.nn.Module, batch, hidden: torch.Tensor) -> torch.Tensor:
    """An auxiliary loss hook (referenced by name in a Stage): a small penalty on hidden-state size."""
    return 1e-3 * hidden.float().pow(2).mean()


def _state(folder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lfm2vl.load(folder).module.state_dict().items()}


def _changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def test_overfit_loss_falls(tiny_train_ckpt, color_data, tmp_path):
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), model=str(tiny_train_ckpt),
        stages=(Stage(data=(str(color_data),), steps=24, lr=3e-3, warmup_steps=2),),
        batch_size=3, eval_data=(str(color_data),), eval_every=12, progress=False,
    )
    result = run(config)
    records = read_metrics(result.metrics)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 24 and result.steps == 24
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(evals) == 2 and evals[1] < evals[0]
    assert all(r["tokens_per_s"] > 0 and r["targets"] > 0 for r in records if "loss" in r)
    with Image.open(result.output_dir / "loss.png") as png:
        assert png.size == (800, 480)
    trained = lfm2vl.load(result.model_dir)  # the saved model loads, with its processor
    assert trained.processor is not None and result.adapter_dir is None


def test_lora_run_saves_adapter_and_matching_merged_model(tiny_train_ckpt, color_data, tmp_path):
    lora = LoraConfig(r=4, alpha=8, targets=("language_model.q_proj", "language_model.w2", "vision_tower.fc1"))
    config = TrainConfig(output_dir=str(tmp_path / "lora"), model=str(tiny_train_ckpt), lora=lora,
                         stages=(Stage(data=(str(color_data),), steps=4, lr=1e-2),), batch_size=3, progress=False)
    result = run(config)
    base, merged = _state(tiny_train_ckpt), _state(result.model_dir)
    # Only the targeted layers moved; everything else is the base checkpoint bit for bit.
    moved = {k for k in base if not torch.equal(base[k], merged[k])}
    assert moved and all(k.endswith(("q_proj.weight", "w2.weight", "fc1.weight")) for k in moved)
    # base + adapter == merged model
    with_adapter = lfm2vl.load(tiny_train_ckpt)
    assert load_adapter(with_adapter.module, result.adapter_dir) == lora
    ids = torch.tensor([[1, 6, 600, 700, 800, 7]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter.module(ids), lfm2vl.load(result.model_dir).module(ids),
                                   rtol=1e-4, atol=1e-4)


def test_stages_freezing_mixture_and_aux_loss(tiny_train_ckpt, color_data, tmp_path):
    text = make_text_data(tmp_path)
    stages = (
        Stage(name="mid", data=(str(color_data),), text_data=(str(text),), text_share=(0.9, 0.3), steps=3,
              lr=1e-2, freeze=("vision_tower", "language_model"), aux_loss="test_train_loop:aux_penalty"),
        Stage(name="sft", data=(str(color_data),), steps=2, lr=1e-4, vision_lr=1e-2,
              freeze=("language_model", "multi_modal_projector")),
    )
    result = run(TrainConfig(output_dir=str(tmp_path / "staged"), model=str(tiny_train_ckpt), stages=stages,
                             batch_size=2, progress=False))
    records = [r for r in read_metrics(result.metrics) if "loss" in r]
    assert [r["stage"] for r in records] == ["mid"] * 3 + ["sft"] * 2
    assert all("aux_loss" in r for r in records[:3]) and not any("aux_loss" in r for r in records[3:])
    base, final = _state(tiny_train_ckpt), _state(result.model_dir)
    assert not _changed(base, final, "language_model.")  # frozen in both stages
    assert _changed(base, final, "multi_modal_projector.") and _changed(base, final, "vision_tower.")
    assert sorted(p.name for p in (result.output_dir / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000005"]


def test_gradient_checkpointing_and_bf16_autocast(tiny_train_ckpt, color_data, tmp_path):
    def losses(name: str, **options) -> list[float]:
        config = TrainConfig(output_dir=str(tmp_path / name), model=str(tiny_train_ckpt), batch_size=3,
                             stages=(Stage(data=(str(color_data),), steps=3, lr=1e-2),), progress=False, **options)
        return [r["loss"] for r in read_metrics(run(config).metrics) if "loss" in r]

    plain = losses("plain")
    assert losses("ckpt", gradient_checkpointing=True) == plain  # recomputation changes nothing
    bf16 = losses("bf16", autocast="bf16")
    assert bf16 != plain and bf16 == pytest.approx(plain, rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_overfit_on_gpu_with_bf16(tiny_train_ckpt, color_data, tmp_path):
    config = TrainConfig(output_dir=str(tmp_path / "gpu"), model=str(tiny_train_ckpt), device="cuda",
                         stages=(Stage(data=(str(color_data),), steps=24, lr=3e-3, warmup_steps=2),),
                         batch_size=3, save_every=12, gradient_checkpointing=True, progress=False)
    result = run(config)
    losses = [r["loss"] for r in read_metrics(result.metrics) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    resumed = run(TrainConfig.from_dict({**config.to_dict(), "resume": True}))  # the last checkpoint closed the run
    assert resumed.steps == 24


def test_resume_refuses_a_changed_recipe(tiny_train_ckpt, color_data, tmp_path):
    config = TrainConfig(output_dir=str(tmp_path / "r"), model=str(tiny_train_ckpt),
                         stages=(Stage(data=(str(color_data),), steps=1),), batch_size=2, progress=False)
    run(config)
    changed = TrainConfig.from_dict({**config.to_dict(), "resume": True, "batch_size": 3})
    with pytest.raises(ValueError, match=r"differs in \['batch_size'\]"):
        run(changed)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(config)  # a fresh run never silently mixes with an earlier one
