"""Data parallelism over `torch.distributed`, as launched by torchrun (gloo on CPU, nccl on GPU).

Every process computes the same global batch plan and keeps its own slice of it. Losses are sums
over target tokens divided by the *global* number of target tokens, and gradients are summed
(not averaged) across processes, so N processes compute exactly the gradient one process
computes for the same global batch. Gradients travel as one flat buffer; a trainable parameter
that got no gradient on this process (e.g. the vision tower on a text-only micro-batch)
contributes zeros, so every process sends a buffer of the same layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str) -> tuple[World, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1; pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return World(rank, size, local, owns), dev


def close(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum of a few numbers over all processes (float64)."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum .grad over processes in place; missing gradients become zeros (the same layout everywhere)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world.size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # (sum of numels,)
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def shard(items: list, world: World, batch_size: int) -> list[list]:
    """This process's micro-batches of a global batch: micro-batch m of rank r is slice (m*size + r)."""
    micro = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return micro[world.rank::world.size]
