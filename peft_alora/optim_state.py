"""Zero the optimizer moments of re-activated rank slots (docs/design.md, decision 4).

A slot is a row of ``lora_A.weight`` and a column of ``lora_B.weight``. Every per-element state
tensor of the optimizer that has the parameter's shape (AdamW's ``exp_avg``/``exp_avg_sq``,
fused AdamW, bitsandbytes' ``state1``/``state2``) gets that slice reset to zero. 8-bit
bitsandbytes states hold codes into a quantisation map: the slice gets the code of 0.0.
Scalar entries such as ``step`` are per tensor and stay as they are.
"""

from __future__ import annotations

import warnings

import torch

from .distributed import assign, reset_deepspeed_moments

# bitsandbytes names the quantisation map of each 8-bit state tensor
_QMAP_OF = {"state1": "qmap1", "state2": "qmap2"}


def _zero_code(qmap: torch.Tensor) -> int:
    return int(qmap.abs().argmin().item())


@torch.no_grad()
def reset_slot_state(optimizer, param: torch.nn.Parameter, index) -> int:
    """Reset ``optimizer.state[param][...][index]`` for every per-element state; returns how many."""
    state = getattr(optimizer, "state", {}).get(param)
    if not state:
        return 0  # no step taken with this parameter yet: nothing to reset
    reset = 0
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.numel() <= 1:
            continue
        if value.shape != param.shape:
            # e.g. Adafactor's factored second moments: one row and one column statistic shared by many slots
            warnings.warn(f"ALoRA: optimizer state {key!r} (shape {tuple(value.shape)}, parameter "
                          f"{tuple(param.shape)}) is shared across rank slots and was not reset for a re-activated "
                          "slot; a regrown rank starts with the moments of the ranks around it. Use an Adam-type "
                          "optimizer for exact fresh-slot moments.")
            continue
        if value.dtype.is_floating_point:
            assign(value, index, 0)
        elif key in _QMAP_OF and _QMAP_OF[key] in state:
            assign(value, index, _zero_code(state[_QMAP_OF[key]]))
        else:
            warnings.warn(f"ALoRA: optimizer state {key!r} ({value.dtype}) of a re-activated slot was not reset.")
            continue
        reset += 1
    return reset


def reset_slots(optimizer, layer, adapter: str, slot: int) -> int:
    """Reset the moments of one slot of a gated layer (A row and B column)."""
    if optimizer is None:
        return 0
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    weight_a = layer.lora_A[adapter].weight
    weight_b = layer.lora_B[adapter].weight
    slices = ((weight_a, (slot, slice(None))), (weight_b, (slice(None), slot)))
    # DeepSpeed ZeRO keeps the moments in flat partitions, not under the parameters
    return sum(reset_deepspeed_moments(param, index) or reset_slot_state(optimizer, param, index)
               for param, index in slices)
