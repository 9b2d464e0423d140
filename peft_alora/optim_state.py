"""Zero the optimizer moments of re-activated rank slots (docs/design.md, decision 4).

A slot is a row of A and a column of B: of the main bank, or a spare slot's own two parameters
(``layers.py``). Every per-element state tensor of the optimizer that has the parameter's shape
(AdamW's ``exp_avg``/``exp_avg_sq``, fused AdamW, bitsandbytes' ``state1``/``state2``) gets that
slice reset to zero. 8-bit bitsandbytes states hold codes into a quantisation map: the slice gets
the code of 0.0. Scalar entries such as ``step`` are per tensor and stay as they are.
"""

from __future__ import annotations

import warnings

import torch

from .distributed import assign, reset_deepspeed_moments

# bitsandbytes names the quantisation map of each 8-bit state tensor
_QMAP_OF = {"state1": "qmap1", "state2": "qmap2"}
# and keeps, beside them, those maps and one scale per block of 8-bit codes: no slot's own state (the code of 0.0
# decodes to zero whatever its block's scale)
_QUANTISATION_KEYS = set(_QMAP_OF.values()) | {"absmax1", "absmax2"}


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
        if not isinstance(value, torch.Tensor) or value.numel() <= 1 or key in _QUANTISATION_KEYS:
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


def _group_and_index(optimizer, param) -> tuple[int, int, dict]:
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, member in enumerate(group["params"]):
            if member is param:
                return group_index, param_index, group
    raise KeyError("parameter not in the optimizer")


@torch.no_grad()
def start_bank_state(optimizer, param: torch.nn.Parameter, like: torch.nn.Parameter) -> bool:
    """Give ``param`` (a spare slot's A row or B column joining the training, no state yet) the state that
    steps with zero gradients would have left it, as under several processes, where the slot takes every
    step: zero moments, and the per-tensor step count of ``like`` (the main bank, which took every step).

    Returns whether a state was made. bitsandbytes optimizers make their own (``init_state``); for
    others every per-element state of ``like`` becomes zeros and every per-tensor value is copied. A
    state of any other form (Adafactor's factored moments) is left for the optimizer to start afresh.
    """
    state = getattr(optimizer, "state", None)
    if state is None or state.get(param) or not state.get(like):
        return False  # it has a state already, or no step has been taken yet: both banks start alike
    reference = state[like]
    try:
        group_index, param_index, group = _group_and_index(optimizer, param)
    except KeyError:
        return False  # not trained by this optimizer
    if hasattr(optimizer, "init_state") and "step" in reference:  # bitsandbytes
        optimizer.init_state(group, param, group_index, param_index)
        state[param]["step"] = reference["step"]
        return True
    made = {}
    for key, value in reference.items():
        if not isinstance(value, torch.Tensor) or (value.numel() <= 1 and value.shape != like.shape):
            made[key] = value.clone() if isinstance(value, torch.Tensor) else value
        elif value.shape == like.shape:
            made[key] = torch.zeros(param.shape, dtype=value.dtype, device=value.device)
        else:
            return False
    state[param] = made
    return True


def reset_slots(optimizer, layer, adapter: str, slot: int) -> int:
    """Reset the moments of one slot of a gated layer (A row and B column)."""
    if optimizer is None:
        return 0
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    weight_a, weight_b, index = layer.slot_parameters(adapter, slot)
    if weight_a is not layer.lora_A[adapter].weight:  # a spare slot: maybe its first step in the forward
        start_bank_state(optimizer, weight_a, layer.lora_A[adapter].weight)
        start_bank_state(optimizer, weight_b, layer.lora_B[adapter].weight)
    slices = ((weight_a, (index, slice(None))), (weight_b, (slice(None), index)))
    # DeepSpeed ZeRO keeps the moments in flat partitions, not under the parameters
    return sum(reset_deepspeed_moments(param, index) or reset_slot_state(optimizer, param, index)
               for param, index in slices)
