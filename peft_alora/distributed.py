"""The one place that knows about process groups and sharded parameters.

Two ways to use several processes (docs/design.md, "Several processes"):

* replicated parameters (one process, DDP): the scoring work is split over the processes and the
  partial sums are all-reduced;
* sharded parameters (FSDP2's ``DTensor`` parameters, FSDP1, DeepSpeed ZeRO-3): every forward is a
  collective, so all processes must run the same passes in the same order. Each process then does
  all the scoring work on the same data and process 0's results are broadcast, so that decisions
  are bit-identical everywhere.

Slot edits on a sharded parameter write only the local shard (``assign``); the full value of a
sharded tensor is gathered with ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def world() -> tuple[int, int]:
    """``(number of processes, this process's index)``; ``(1, 0)`` outside ``torch.distributed``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _on_backend_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device) if torch.distributed.get_backend() == "nccl" else tensor.cpu()


def sum_across_processes(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All-reduce (sum) a tensor; every process gets the same bits back, on the tensor's own device."""
    if world()[0] == 1:
        return tensor
    moved = _on_backend_device(tensor, device)
    torch.distributed.all_reduce(moved)
    return moved.to(tensor.device)


def broadcast_from_first(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Process 0's value of a tensor, in every process (same bits everywhere)."""
    if world()[0] == 1:
        return tensor
    moved = _on_backend_device(tensor, device).contiguous()
    torch.distributed.broadcast(moved, src=0)
    return moved.to(tensor.device)


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without torch.distributed
        return False
    return isinstance(tensor, DTensor)


def _flattened_by_fsdp1(param) -> bool:
    return bool(getattr(param, "_fsdp_flattened", False))  # FSDP1 marks every parameter it flattened


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether some parameter of ``model`` is split across processes: an FSDP2 ``DTensor``, an FSDP1 flat
    parameter, or a DeepSpeed ZeRO-3 partitioned parameter (``ds_id``)."""
    if world()[0] == 1:
        return False
    for param in model.parameters():
        if _is_dtensor(param) or hasattr(param, "ds_id") or _flattened_by_fsdp1(param):
            return True
    return False


@dataclass
class WorkShare:
    """This process's share of a work list (``mine``) and how partial results become the total."""

    mine: list
    split: bool

    def total(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Split work: the sum of every process's partial result. Whole work: process 0's result."""
        return sum_across_processes(tensor, device) if self.split else broadcast_from_first(tensor, device)


def share_work(model: torch.nn.Module, items: Sequence) -> WorkShare:
    """Replicated parameters: every ``processes``-th item from this process's index. Sharded parameters:
    all of them, since every process must run the same forward passes in the same order."""
    processes, me = world()
    items = list(items)
    if processes == 1 or is_sharded(model):
        return WorkShare(items, split=False)
    return WorkShare(items[me::processes], split=True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor: a sharded ``DTensor`` is gathered (a collective: every process must call
    it, in the same order); any other tensor is returned as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


@torch.no_grad()
def assign(tensor: torch.Tensor, index, value) -> None:
    """``tensor[index] = value``, also when ``tensor`` is a sharded ``DTensor``: each process writes the part
    of ``index`` that lies in its own shard (no communication; ``value`` must be the same everywhere)."""
    if not _is_dtensor(tensor):
        tensor[index] = value
        return
    from torch.distributed.tensor import distribute_tensor

    local = tensor.to_local()
    whole = torch.zeros(tensor.shape, dtype=local.dtype, device=local.device)
    mask = torch.zeros(tensor.shape, dtype=torch.bool, device=local.device)
    whole[index] = value.to(whole) if isinstance(value, torch.Tensor) else value
    mask[index] = True
    # src_data_rank=None: every process cuts its own shard out of its own (identical) full tensor
    pieces = [distribute_tensor(t, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
              for t in (whole, mask)]
    local[pieces[1]] = pieces[0][pieces[1]]


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained entries of ``model.state_dict()`` (trainable parameters, ``lora_*`` buffers such as the
    gates) as whole tensors, for ``model.save_pretrained(path, state_dict=...)`` under FSDP2, whose own
    state dict holds local shards. A collective: every process calls it; the frozen base is not gathered."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: full(value) for name, value in model.state_dict().items()
            if name in trained or ".lora_" in name}


def check_engine(model: torch.nn.Module, optimizer=None) -> None:
    """Refuse, naming the option, the multi-process set-ups whose ALoRA rounds are not supported (untested, or
    known to lose slot edits), instead of hanging or diverging silently."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without torch.distributed
        FullyShardedDataParallel = ()
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
            _flattened_by_fsdp1(p) for p in model.parameters()):
        raise ValueError("ALoRA does not support FSDP1 (flat parameters): use FSDP2, i.e. fsdp_version: 2 in the "
                         "accelerate config / TrainingArguments.fsdp_config, or torch's fully_shard.")
    owners = []
    while optimizer is not None and len(owners) < 8:  # accelerate's and DeepSpeed's wrappers hold the optimizer
        owners.append(type(optimizer).__module__)
        optimizer = getattr(optimizer, "optimizer", None)
    if any(hasattr(p, "ds_id") for p in model.parameters()) or any(o.startswith("deepspeed") for o in owners):
        raise ValueError("ALoRA does not support DeepSpeed ZeRO yet: its optimizer keeps fp32 master copies and "
                         "moments that the slot edits of a round do not reach. Use FSDP2 (fsdp_version: 2) or DDP.")
    for param in model.parameters():
        if _is_dtensor(param) and param.device.type != param.device_mesh.device_type:
            raise ValueError(f"ALoRA does not support FSDP parameter CPU offload (parameters on {param.device.type}, "
                             f"computed on {param.device_mesh.device_type}): set offload_params: false in the FSDP "
                             "config (torch: no CPUOffloadPolicy).")


def fsdp_ignored_warning(args, model: torch.nn.Module):
    """The warning to give when ``TrainingArguments.fsdp`` asks for FSDP but no parameter is sharded (accelerate
    applies FSDP only on accelerators: on the CPU it runs DDP), else None."""
    if not getattr(args, "fsdp", None) or is_sharded(model):
        return None
    return (f"TrainingArguments.fsdp={args.fsdp!r} asks for FSDP, but no parameter of the model is sharded: accelerate "
            "applies FSDP only on accelerators (GPUs), and on the CPU it ran DDP with full copies in every process. "
            "ALoRA's decisions are the same either way; the memory saving is not there.")
