"""Gated LoRA layers: PEFT's LoRA layers with ``max_r`` rank slots and a 0/1 gate per slot.

    h = W0 x + s * B diag(g) A x,        s = lora_alpha / r_init (fixed)

The gate lives in ``lora_gate[adapter]`` (fp32 buffer, saved with the adapter). Everything else
(forward plumbing, dtype casts, merge/unmerge of plain, 4-bit and 8-bit weights, disable,
multi-adapter) is PEFT's own code: the gate enters through PEFT's ``LoraVariant`` hook, which
LoRA's layers call for forward, merge and unmerge.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose

from .config import ALoRAConfig
from .distributed import assign


class GatedVariant(LoraVariant):
    """Forward and merge of a gated adapter; PEFT calls these from its LoRA layers."""

    def supports_lora_conversion(self) -> bool:
        return False  # use peft_alora.export_lora instead

    @staticmethod
    def init(module, adapter_name, **kwargs) -> None:
        pass  # the gate is created in GatedLoraMixin.update_layer, after PEFT's own set-up

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        if not torch.is_autocast_enabled(x.device.type):
            # under autocast the adapter's matmuls take their inputs in the autocast dtype anyway; a copy of
            # x in fp32 here (PEFT's own 4-bit and 8-bit paths skip it under CUDA autocast) made every
            # QLoRA module write and read its input twice more
            x = module._cast_input_dtype(x, lora_A.weight.dtype)
        hidden = lora_A(dropout(x))
        gate = module.lora_gate[active_adapter].to(hidden.dtype)
        return result + lora_B(hidden * gate) * module.scaling[active_adapter]


def fresh_a_row(in_features: int, init_lora_weights, r_init: int, generator=None, device=None, dtype=None):
    """One new row of A, drawn as PEFT draws a fresh LoRA A (kaiming-uniform, or gaussian std 1/r)."""
    row = torch.empty(1, in_features, device="cpu", dtype=torch.float32)
    if init_lora_weights == "gaussian":
        row.normal_(0.0, 1.0 / r_init, generator=generator)
    else:
        torch.nn.init.kaiming_uniform_(row, a=math.sqrt(5), generator=generator)
    return row.to(device=device, dtype=dtype)


class GatedLoraMixin:
    """Adds rank slots, the gate and the rank-state API to a PEFT LoRA layer class."""

    # per-adapter state besides LoRA's own; listed so that PEFT's delete_adapter removes it too
    other_param_names = LoraLayer.other_param_names + ("lora_gate", "lora_scale", "r_init", "init_lora_weights")

    def resolve_lora_variant(self, *, config, **kwargs) -> Optional[LoraVariant]:
        return GatedVariant()

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if not isinstance(config, ALoRAConfig):
            raise TypeError(
                f"adapter {adapter_name!r} ({type(config).__name__}) cannot be added to a module that holds an ALoRA "
                "adapter: ALoRA and other LoRA adapters cannot share modules. Use ALoRAConfig for every adapter of "
                "this model, or load the other adapter into a fresh copy of the base model."
            )
        if not hasattr(self, "lora_gate"):
            self.lora_gate = BufferDict(persistent=True)
            self.lora_scale = BufferDict(persistent=True)
            self.r_init = {}
            self.init_lora_weights = {}
        r_init = r
        capacity = config.capacity
        super().update_layer(adapter_name, capacity, lora_alpha=lora_alpha, config=config, **kwargs)
        # PEFT sized everything for `capacity` slots; the scale follows the initial rank instead.
        self.r[adapter_name] = r_init
        self.r_init[adapter_name] = r_init
        self.init_lora_weights[adapter_name] = config.init_lora_weights
        if config.init_lora_weights == "gaussian":
            # PEFT drew A with std 1 / capacity; a rank-r LoRA (and every later fresh rank) uses 1 / r
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        denom = math.sqrt(r_init) if config.use_rslora else r_init
        self.scaling[adapter_name] = lora_alpha / denom
        # on the base layer's device, never on "meta" (low_cpu_mem_usage builds A and B there, and PEFT then
        # moves every lora_* submodule without meta parameters: a meta buffer cannot be moved)
        device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        gate = torch.zeros(capacity, dtype=torch.float32, device=device)
        gate[:r_init] = 1.0
        self.lora_gate[adapter_name] = gate
        # saved with the weights, so that a load can tell when r / lora_alpha in adapter_config.json were changed
        self.lora_scale[adapter_name] = torch.tensor([self.scaling[adapter_name]], dtype=torch.float32, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for adapter in self.lora_gate:
            if f"{prefix}lora_A.{adapter}.weight" in state_dict:  # this load carries weights of `adapter`
                self._check_loaded_adapter(state_dict, prefix, adapter)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_loaded_adapter(self, state_dict, prefix, adapter: str) -> None:
        """Refuse adapter files whose gates are missing or not 0/1, or whose scale disagrees with the config."""
        where = prefix.removeprefix("base_model.model.").rstrip(".")
        gate = state_dict.get(f"{prefix}lora_gate.{adapter}")
        if gate is None:
            raise ValueError(
                f"the adapter weights of {where} have no lora_gate: an ALoRA adapter file carries its gates (the "
                "allocation); without them it would silently restart from the first r slots. Load a file written "
                "by save_pretrained of an ALoRA model (a stock LoRA export loads with peft.LoraConfig instead)."
            )
        capacity = self.lora_gate[adapter].numel()
        if gate.shape != (capacity,):
            raise ValueError(
                f"lora_gate of {where} has shape {tuple(gate.shape)}, but the config gives {capacity} slots (max_r): "
                "adapter_config.json does not match these weights; restore its r / max_r."
            )
        gate = gate.float()
        if not bool(torch.isfinite(gate).all()) or not bool(((gate == 0) | (gate == 1)).all()):
            bad = sorted({float(v) for v in gate[(gate != 0) & (gate != 1)].tolist()})
            raise ValueError(f"lora_gate of {where} holds values other than 0 and 1 ({bad}): the adapter file is "
                             "damaged or was edited; gates are on/off switches.")
        scale = state_dict.get(f"{prefix}lora_scale.{adapter}")
        if scale is None:
            warnings.warn(f"ALoRA: the adapter weights of {where} carry no lora_scale (saved by an older "
                          "peft_alora): r and lora_alpha of adapter_config.json cannot be checked against them.")
        elif not math.isclose(float(scale.reshape(-1)[0]), self.scaling[adapter], rel_tol=1e-6):
            raise ValueError(
                f"the weights of {where} were trained with the scale {float(scale.reshape(-1)[0]):g} "
                f"(lora_alpha / r), but adapter_config.json gives {self.scaling[adapter]:g}: restore the original "
                "r, lora_alpha and use_rslora in adapter_config.json."
            )

    def _move_adapter_to_device_of_base_layer(self, adapter_name, device=None):
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        for buffers in (getattr(self, "lora_gate", None), getattr(self, "lora_scale", None)):
            if buffers is not None and adapter_name in buffers and buffers[adapter_name].dtype != torch.float32:
                buffers[adapter_name] = buffers[adapter_name].float()  # gates and scales stay fp32 whatever the base

    def get_delta_weight(self, adapter) -> torch.Tensor:
        weight_A = self.lora_A[adapter].weight
        weight_B = self.lora_B[adapter].weight
        dtype = weight_B.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        gate = self.lora_gate[adapter].to(weight_A.device, compute)
        delta = (weight_B.to(compute) * gate) @ weight_A.to(compute)
        delta = transpose(delta, getattr(self, "fan_in_fan_out", False)) * self.scaling[adapter]
        return delta.to(dtype)

    # ---- rank-state API (used by the allocator) -------------------------------------------

    def capacity(self, adapter: str) -> int:
        return self.lora_gate[adapter].numel()

    def active_slots(self, adapter: str) -> list[int]:
        return torch.nonzero(self.lora_gate[adapter] > 0).flatten().tolist()

    def num_active(self, adapter: str) -> int:
        return int((self.lora_gate[adapter] > 0).sum().item())

    def active_parameter_count(self, adapter: str) -> int:
        return self.num_active(adapter) * (self.in_features + self.out_features)

    def _check_unmerged(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged into the base weights: changing its gates now would "
                             "make unmerge_adapter() subtract the wrong delta. Call unmerge_adapter() first.")

    def deactivate_slot(self, adapter: str, slot: int) -> None:
        self._check_unmerged(adapter)
        gate = self.lora_gate[adapter]
        if gate[slot] == 0:
            raise ValueError(f"slot {slot} of adapter {adapter!r} is already inactive")
        gate[slot] = 0.0

    @torch.no_grad()
    def activate_slot(self, adapter: str, slot: int, generator: Optional[torch.Generator] = None,
                      direction: Optional[torch.Tensor] = None) -> None:
        """Switch a slot on as a fresh rank: new A row, zero B column, gate 1 (output unchanged).

        ``direction`` (a unit vector of length ``in_features``), when given, is where the new A row
        points; it keeps the norm of the random row it replaces (see ``peft_alora.regrowth``)."""
        self._check_unmerged(adapter)
        gate = self.lora_gate[adapter]
        if gate[slot] != 0:
            raise ValueError(f"slot {slot} of adapter {adapter!r} is already active")
        weight_A = self.lora_A[adapter].weight
        weight_B = self.lora_B[adapter].weight
        row = fresh_a_row(self.in_features, self.init_lora_weights.get(adapter, True), self.r_init[adapter],
                          generator=generator)[0]
        if direction is not None:
            row = direction.to(row) * row.norm()
        assign(weight_A, slot, row.to(device=weight_A.device, dtype=weight_A.dtype))
        assign(weight_B, (slice(None), slot), 0.0)
        gate[slot] = 1.0


class GatedLinear(GatedLoraMixin, lora_layer.Linear):
    """Gated LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (``fan_in_fan_out=True``)."""


def _bnb_classes():
    """Gated 4-bit / 8-bit layers, or ``(None, None)`` when bitsandbytes is not importable."""
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    gated_8bit = gated_4bit = None
    if is_bnb_available():
        from peft.tuners.lora.bnb import Linear8bitLt

        class GatedLinear8bitLt(GatedLoraMixin, Linear8bitLt):
            """Gated LoRA on a bitsandbytes 8-bit linear layer."""

        gated_8bit = GatedLinear8bitLt
    if is_bnb_4bit_available():
        from peft.tuners.lora.bnb import Linear4bit

        class GatedLinear4bit(GatedLoraMixin, Linear4bit):
            """Gated LoRA on a bitsandbytes 4-bit (QLoRA) linear layer."""

        gated_4bit = GatedLinear4bit
    return gated_8bit, gated_4bit


GatedLinear8bitLt, GatedLinear4bit = _bnb_classes()
