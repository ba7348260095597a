"""DistributedDataParallel on torch's own launcher: `torchrun --nproc_per_node N`.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op and
training runs in one process. gloo on CPU, nccl on CUDA. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def process_group(device: str):
    """Join torchrun's process group for the duration of training (when launched by it)."""
    if world_size() == 1 or active():
        yield
        return
    use_nccl = device != "cpu" and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if use_nccl else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module) -> nn.Module:
    """The model as the training step calls it: DDP-wrapped when distributed."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [local_rank()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def sum_over_processes(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int):
    """Epoch totals over all processes, as Python numbers (one device-to-host copy)."""
    seen_tensor = torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device)
    totals = torch.stack([loss_sum.double(), correct.double(), seen_tensor])
    if active():
        dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    return loss_sum, correct, int(seen)


def sync_buffers(model: nn.Module) -> None:
    """Give every process rank 0's batch-norm statistics, so validation (and with it early
    stopping) decides the same everywhere."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
