"""The one place that knows about process groups: how many processes score, and summing across them."""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """``(number of processes, this process's index)``; ``(1, 0)`` outside ``torch.distributed``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def sum_across_processes(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All-reduce (sum) a tensor; every process gets the same bits back, on the tensor's own device."""
    if world()[0] == 1:
        return tensor
    dist = torch.distributed
    moved = tensor.to(device) if dist.get_backend() == "nccl" else tensor.cpu()
    dist.all_reduce(moved)
    return moved.to(tensor.device)
