"""The training loop: `run(TrainConfig)` fine-tunes an LFM2-VL checkpoint, fully or with LoRA.

Stages run in order; each builds a fresh AdamW over its trainable parameters (vision tower at its
own LR) with warmup + cosine. One optimizer step = `grad_accum` micro-batches per process; the
loss is summed over assistant target tokens and divided by the global target count, and
gradients are summed across processes (dist.py), so the result does not depend on how the
global batch is split. On a GPU, batches are encoded one step ahead on a worker thread.
Checkpoints hold everything needed to continue bit-for-bit (checkpoint.py); at the end the model
is saved in the Hugging Face layout (`<output>/model`, LoRA runs also `<output>/adapter`).

A stage's `aux_loss` ("package.module:function") is called as `fn(module, batch, hidden)` on
every micro-batch, with the final hidden states (B, T, D); it returns a scalar that is averaged
over micro-batches and added to the loss.
"""

from __future__ import annotations

import importlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import api
from ..weights import stored_dtype
from . import checkpoint, dist
from .batch import IGNORE, Batch, Example, collate, encode
from .config import Stage, TrainConfig
from .data import Source, open_data
from .lora import apply_lora, merge_lora, save_adapter
from .metrics import MetricsLog, plot_losses, read_metrics
from .schedule import MixturePlan, lr_factor

log = logging.getLogger("lfm2vl.train")
OnStep = Callable[[int, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    steps: int  # optimizer steps done in total
    final_loss: float | None
    model_dir: Path | None  # the saved full model (merged, for LoRA runs)
    adapter_dir: Path | None  # LoRA runs: the adapter alone
    metrics: Path


# -- model pieces ---------------------------------------------------------------------------------
def forward_hidden(module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Final hidden states (B, T, D); the logits are computed later for target positions only."""
    return module(
        batch.input_ids, batch.attention_mask, batch.pixel_values, spatial_shapes=batch.spatial_shapes,
        return_hidden=True,
    )


def target_loss_sum(module: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the next token at every target position (float32)."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    logits = module.logits(hidden[:, :-1][keep]).float()  # (N_targets, V): never the full (B, T, V)
    return F.cross_entropy(logits, targets[keep], reduction="sum")


def is_trainable(name: str, stage: Stage, lora: bool) -> bool:
    if any(name == p or name.startswith(p + ".") for p in stage.freeze):
        return False
    return (".lora_A." in name or ".lora_B." in name) if lora else True


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.autocast == "none":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if config.autocast == "bf16":
        if device.type == "cuda":
            raise ValueError("autocast='bf16' but this GPU does not support bfloat16")
        return torch.bfloat16
    return None  # "auto" on CPU: float32 (bf16 autocast is slow on most CPUs)


def make_optimizer(
    module: torch.nn.Module, stage: Stage, config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: vision tower at `vision_lr`, no decay on norms and biases."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("vision_tower."), p.ndim >= 2), []).append(p)
    if not groups:
        raise ValueError(f"stage {stage.name!r} trains nothing: every parameter is frozen")
    param_groups = []
    for (vision, decay), params in sorted(groups.items()):
        base = stage.vision_lr if vision and stage.vision_lr is not None else stage.lr
        param_groups.append({"params": params, "base_lr": base, "lr": base,
                             "weight_decay": config.weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, betas=config.betas, fused=device.type == "cuda")


def load_hook(spec: str | None) -> Callable | None:
    """The function a stage's `aux_loss` names ("package.module:function")."""
    if spec is None:
        return None
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


# -- the run --------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: TrainConfig, world: dist.World, device: torch.device, on_step: OnStep | None):
        self.config, self.world, self.device, self.on_step = config, world, device, on_step
        self.out = Path(config.output_dir)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=world.is_main)
        self._seed(config.seed)  # the same on every process: identical LoRA init everywhere
        self.model = api.load(config.model, device=device, dtype=config.dtype)
        if self.model.processor is None:
            raise ValueError(f"{config.model}: a checkpoint without tokenizer.json cannot be trained on text")
        self.module, self.processor = self.model.module, self.model.processor
        if config.lora is not None:
            lc = config.lora
            apply_lora(self.module, lc.targets, lc.r, lc.alpha, lc.dropout)
        self.module.train()
        self.module.vision_tower.gradient_checkpointing = config.gradient_checkpointing
        self.module.language_model.gradient_checkpointing = config.gradient_checkpointing
        self._seed(config.seed + 1 + world.rank)  # per-process randomness (dropout) from here on
        self.amp = autocast_dtype(config, device)
        self.saved_names = [n for n, _ in self.module.named_parameters()
                            if any(is_trainable(n, s, config.lora is not None) for s in config.stages)]
        self.eval_source = open_data(config.eval_data) if config.eval_data else None
        self._eval_cache: list[Example] | None = None
        self.pad_id = self.processor.pad_token_id if self.processor.pad_token_id is not None else 0
        self.global_step, self.last_loss = 0, None

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _autocast(self) -> AbstractContextManager:
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    # -- data -------------------------------------------------------------------------------------
    def _sources(self, stage: Stage) -> dict[str, Source]:
        sources = {"main": open_data(stage.data)}
        if stage.text_data:
            sources["text"] = open_data(stage.text_data)
        return sources

    def _encode_step(self, sources: dict[str, Source], samples: list[tuple[str, int]]) -> list[Batch]:
        mine = dist.shard(samples, self.world, self.config.batch_size)
        return [
            collate([encode(self.processor, sources[s].record(i), self.config.max_length) for s, i in micro],
                    self.pad_id, self.config.padding_side)
            for micro in mine
        ]

    def _step_batches(self, sources: dict[str, Source], plan: MixturePlan, start: int, end: int
                      ) -> Iterator[tuple[int, list[Batch]]]:
        """(step, this process's micro-batches); on a GPU the next step is encoded in the background.

        Not on the CPU: there encoding and compute share the same cores, and two threads issuing
        OpenMP-parallel torch ops fight over them (a tiny run was 6x slower on a busy 2-core box).
        """
        if self.device.type == "cpu":
            for step in range(start, end):
                yield step, self._encode_step(sources, plan.batch(step))
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            nxt = pool.submit(self._encode_step, sources, plan.batch(start)) if start < end else None
            for step in range(start, end):
                current = nxt
                nxt = pool.submit(self._encode_step, sources, plan.batch(step + 1)) if step + 1 < end else None
                yield step, current.result()

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self, micro: list[Batch], opt: torch.optim.Optimizer, factor: float, aux: Callable | None
                   ) -> dict[str, float]:
        params = [p for g in opt.param_groups for p in g["params"]]
        targets, tokens = dist.all_sum([sum(b.n_targets for b in micro), sum(b.n_tokens for b in micro)],
                                       self.world, self.device)
        n_micro = self.config.grad_accum * self.world.size
        ce_sum = aux_sum = 0.0
        for batch in micro:
            batch = batch.to(self.device)
            with self._autocast():
                hidden = forward_hidden(self.module, batch)
                ce = target_loss_sum(self.module, hidden, batch.labels)
                loss = ce / max(targets, 1.0)
                if aux is not None:
                    extra = aux(self.module, batch, hidden)
                    loss = loss + extra / n_micro
                    aux_sum += float(extra.detach())
            if loss.requires_grad:  # False when nothing trainable is on this batch's path (e.g. text-only,
                loss.backward()  # only the projector training): its gradients are zeros (dist.sum_gradients)
            ce_sum += float(ce.detach())
        dist.sum_gradients(params, self.world)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        opt.step()
        opt.zero_grad(set_to_none=True)
        ce_sum, aux_sum = dist.all_sum([ce_sum, aux_sum], self.world, self.device)
        out = {"loss": ce_sum / max(targets, 1.0), "grad_norm": grad_norm, "targets": int(targets), "tokens": int(tokens)}
        if aux is not None:
            out["aux_loss"] = aux_sum / n_micro
        return out

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean target-token loss over the held-out set (examples shared round-robin across processes)."""
        if self.eval_source is None:
            return None
        if self._eval_cache is None:
            n = len(self.eval_source)
            n = min(n, self.config.eval_max_samples) if self.config.eval_max_samples else n
            self._eval_cache = [encode(self.processor, self.eval_source.record(i), self.config.max_length)
                                for i in range(self.world.rank, n, self.world.size)]
        self.module.eval()
        ce, targets = 0.0, 0.0
        bs = self.config.batch_size
        for i in range(0, len(self._eval_cache), bs):
            batch = collate(self._eval_cache[i:i + bs], self.pad_id, self.config.padding_side).to(self.device)
            with self._autocast():
                ce += float(target_loss_sum(self.module, forward_hidden(self.module, batch), batch.labels))
            targets += batch.n_targets
        self.module.train()
        ce, targets = dist.all_sum([ce, targets], self.world, self.device)
        return ce / max(targets, 1.0)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, stage_idx: int, stage_step: int, opt, plan: MixturePlan) -> None:
        params = dict(self.module.named_parameters())
        state = {
            "stage": stage_idx, "stage_step": stage_step, "global_step": self.global_step,
            "model": {n: params[n].detach().cpu().clone() for n in self.saved_names},
            "optimizer": opt.state_dict(), "data": plan.state_after(stage_step - 1), "last_loss": self.last_loss,
        }
        checkpoint.save(self.out, self.global_step, state, self.config, self.world, self.config.keep_checkpoints)

    def restore(self) -> dict[str, Any] | None:
        path = checkpoint.latest(self.out)
        if path is not None and not self.config.resume:
            raise ValueError(
                f"{self.out} already holds checkpoints of an earlier run ({path.name}): resume it (resume=True, "
                "--resume) or choose another output_dir"
            )
        if path is None:
            if self.config.resume and self.world.is_main:
                log.info("no checkpoint in %s: starting from step 0", self.out)
            self.metrics.truncate_after(0)
            return None
        state = checkpoint.load(path, self.config, self.world)
        if sorted(state["model"]) != sorted(self.saved_names):
            raise ValueError(f"{path} stores other tensors than this run trains: was LoRA or freezing changed?")
        with torch.no_grad():
            params = dict(self.module.named_parameters())
            for name, t in state["model"].items():
                params[name].copy_(t)
        self.global_step, self.last_loss = state["global_step"], state["last_loss"]
        self.metrics.truncate_after(self.global_step)
        if self.world.is_main:
            log.info("resumed from %s (step %d)", path, self.global_step)
        return state

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config = self.config
        state = self.restore()
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            config.save(self.out / "train_config.json")
        first, first_step = (state["stage"], state["stage_step"]) if state else (0, 0)
        bar = tqdm(total=config.total_steps, initial=self.global_step, dynamic_ncols=True,
                   disable=not (config.progress and self.world.is_main))
        for stage_idx in range(first, len(config.stages)):
            stage = config.stages[stage_idx]
            resumed = state if stage_idx == first else None
            if resumed is not None and first_step >= stage.steps:
                continue  # the checkpoint closed this stage: the next one starts fresh
            self._run_stage(stage_idx, stage, resumed, bar)
        bar.close()
        return self._finish()

    def _run_stage(self, stage_idx: int, stage: Stage, state: dict[str, Any] | None, bar: tqdm) -> None:
        config, lora = self.config, self.config.lora is not None
        for name, p in self.module.named_parameters():
            p.requires_grad_(is_trainable(name, stage, lora))
        opt = make_optimizer(self.module, stage, config, self.device)
        sources = self._sources(stage)
        global_batch = config.batch_size * config.grad_accum * self.world.size
        plan = MixturePlan({k: len(v) for k, v in sources.items()}, global_batch, stage.steps, config.seed,
                           stage_idx, stage.text_share if "text" in sources else None)
        start = 0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            plan.load_state(state["data"])
            start = state["stage_step"]
        aux = load_hook(stage.aux_loss)
        for step, micro in self._step_batches(sources, plan, start, stage.steps):
            t0 = time.perf_counter()
            factor = lr_factor(step, stage.steps, stage.warmup_steps, stage.min_lr_ratio)
            stats = self.train_step(micro, opt, factor, aux)
            self.global_step += 1
            self.last_loss = stats["loss"]
            record = {"step": self.global_step, "stage": stage.name, "lr": stage.lr * factor, **stats,
                      "tokens_per_s": stats["tokens"] / max(time.perf_counter() - t0, 1e-9)}
            done = step + 1
            if done % config.log_every == 0 or done == stage.steps:
                self.metrics.write(record)
            bar.update(1)
            bar.set_postfix(stage=stage.name, loss=f"{stats['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if (config.eval_every and done % config.eval_every == 0) or done == stage.steps:
                self._log_eval()
            if (config.save_every and done % config.save_every == 0) or done == stage.steps:
                self.save_checkpoint(stage_idx, done, opt, plan)
                self._plot()
            if self.on_step is not None:
                self.on_step(self.global_step, record)

    def _log_eval(self) -> None:
        loss = self.evaluate()
        if loss is not None:
            self.metrics.write({"step": self.global_step, "eval_loss": loss})
            if self.world.is_main:
                log.info("step %d: eval loss %.4f", self.global_step, loss)

    def _plot(self) -> None:
        if self.world.is_main and self.metrics.path.exists():
            plot_losses(read_metrics(self.metrics.path), self.out / "loss.png")

    def _finish(self) -> TrainResult:
        config, model_dir, adapter_dir = self.config, None, None
        if self.world.is_main:
            self._plot()
            source = self.model.source
            dtype = api.parse_dtype(config.save_dtype) or (stored_dtype(source) if source else None)
            if config.lora is not None:
                adapter_dir = save_adapter(self.module, self.out / "adapter", config.lora, config.model)
            if config.lora is None or config.save_merged:
                merge_lora(self.module)
                if dtype is not None:
                    self.module.to(dtype=dtype)
                model_dir = self.out / "model"
                self.model.save_pretrained(model_dir)
        dist.barrier(self.world)
        return TrainResult(self.out, self.global_step, self.last_loss, model_dir, adapter_dir, self.metrics.path)


def run(config: TrainConfig, on_step: OnStep | None = None) -> TrainResult:
    """Train as `config` says (resuming if asked); under torchrun, as one of the data-parallel processes.

    `on_step(step, record)` is called on every process after each optimizer step with the
    metrics record of that step.
    """
    world, device = dist.init(config.device)
    try:
        return Trainer(config, world, device, on_step).train()
    finally:
        dist.close(world)
