"""The one place that knows about process groups and sharded parameters.

Two ways to use several processes (docs/design.md, "Several processes"):

* replicated parameters (DDP, DeepSpeed ZeRO-2): the scoring work is split over the processes and
  the partial sums are all-reduced;
* sharded parameters (FSDP2's ``DTensor`` parameters, DeepSpeed ZeRO-3): every forward is a
  collective, so all processes must run the same passes in the same order. Each process then does
  all the scoring work on the same data and process 0's results are broadcast, so that decisions
  are bit-identical everywhere.

Slot edits on a sharded parameter write only the local shard (``assign``), under DeepSpeed also its
fp32 master copy and moments; the full value of a sharded tensor is gathered with ``full``.
``check_engine`` refuses the set-ups this does not cover (FSDP1, offload).
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


def leave_process_group() -> None:
    """At the end of a run: wait for every process, then tear the process group down before the
    interpreter exits. Left to interpreter exit, gloo's threads aborted a finished process once in CI
    ("terminate called without an active exception", SIGABRT)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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


def _is_deepspeed(param) -> bool:
    """A parameter managed by a DeepSpeed ZeRO optimizer: partitioned (ZeRO-3) or with fp32 master copies."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor: a sharded ``DTensor`` or a ZeRO-3 parameter is gathered (a collective:
    every process must call it, in the same order); any other tensor is returned as it is."""
    if _is_dtensor(tensor):
        return tensor.full_tensor()
    if hasattr(tensor, "ds_id"):
        import deepspeed

        if getattr(tensor.ds_status, "name", "") == "AVAILABLE":  # left gathered by a pass outside the engine
            return tensor.data.clone()
        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.data.clone()
    return tensor


@torch.no_grad()
def assign(tensor: torch.Tensor, index, value) -> None:
    """``tensor[index] = value``, also when ``tensor`` is a sharded ``DTensor``: each process writes the part
    of ``index`` that lies in its own shard (no communication; ``value`` must be the same everywhere). A
    DeepSpeed ZeRO parameter gets the value in its working copy and in the optimizer's fp32 master copy."""
    if _is_deepspeed(tensor):
        _assign_deepspeed(tensor, index, value)
        return
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


def release_gathered(model: torch.nn.Module) -> None:
    """Under ZeRO-3, partition again the weights that passes outside the engine left gathered: DeepSpeed frees
    a module's weights after its backward only when the module's input needs a gradient, which scoring
    passes with frozen weights do not give (a later gather of such a weight fails). Collective; a no-op
    for other engines (FSDP2 reshards by itself, checked)."""
    param = next((p for p in model.parameters() if hasattr(p, "ds_id")), None)
    if param is not None and hasattr(getattr(param, "_z3_optimizer", None), "empty_partition_cache"):
        param._z3_optimizer.empty_partition_cache()


def _assign_deepspeed(param: torch.Tensor, index, value) -> None:
    """Write the model's copy (gathered and re-partitioned under ZeRO-3) and the fp32 master copy, which the
    next optimizer step would otherwise copy back over the edit. Collective: every process calls it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id")):
        param.data[index] = value
    master = safe_get_full_fp32_param(param)
    if master is not None:
        master[index] = value
        safe_set_full_fp32_param(param, master)


def reset_deepspeed_moments(param: torch.Tensor, index) -> int:
    """Zero ``index`` of the Adam moments DeepSpeed keeps for ``param`` in its flat fp32 partitions; returns how
    many states were reset (0 for a parameter DeepSpeed does not manage)."""
    if not _is_deepspeed(param):
        return 0
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    reset = 0
    for key in ("exp_avg", "exp_avg_sq"):
        state = safe_get_full_optimizer_state(param, key)
        if state is None:
            continue
        state[index] = 0
        safe_set_full_optimizer_state(param, state, key)
        reset += 1
    return reset


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's entries of ``model.state_dict()`` (trainable parameters, ``lora_*`` entries such as the
    gates, ``modules_to_save``) as whole tensors, for ``model.save_pretrained(path, state_dict=...)`` under
    FSDP2 or ZeRO-3, whose own state dicts hold shards. A collective: every process calls it; the frozen base
    is not gathered."""
    params = dict(model.named_parameters())  # ZeRO-3 gathers through the parameter, not its state-dict entry
    trained = {name for name, p in params.items() if p.requires_grad}
    return {name: full(params.get(name, value)).detach() for name, value in model.state_dict().items()
            if name in trained or ".lora_" in name or "modules_to_save" in name}


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
    zeros = []
    while optimizer is not None and len(zeros) < 8:  # accelerate's and DeepSpeed's wrappers hold the optimizer
        zeros.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    zeros = [z for z in zeros if type(z).__module__.startswith("deepspeed")]
    if any(getattr(zero, flag, False) for zero in zeros for flag in ("cpu_offload", "offload_optimizer", "offload_param")):
        raise ValueError("ALoRA does not support DeepSpeed ZeRO offload (offload_optimizer_device / "
                         "offload_param_device): set both to none in the DeepSpeed config.")
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
