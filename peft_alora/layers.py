"""Gated LoRA layers: PEFT's LoRA layers with ``max_r`` rank slots and a 0/1 gate per slot.

    h = W0 x + s * B diag(g) A x,        s = lora_alpha / r_init (fixed)

The slots sit in two banks: slots ``0 .. r_init-1`` in PEFT's own ``lora_A`` / ``lora_B``, the
spare slots ``r_init .. max_r-1`` in ``lora_A_spare`` / ``lora_B_spare``. Until a slot of the spare
bank is first grown, the forward is a plain rank-r LoRA: in one process the spare bank is left
out, so it gets no gradient and AdamW keeps no moments for it (docs/benchmarks.md, "The two-bank
layout"); under ``torch.distributed`` it adds exact zeros, since DDP's default, FSDP and ZeRO-3
expect every parameter in every step. From its first grown slot on, both banks run as one matmul
(``JoinedLinear``), as the one-bank layout did. Spare slots hold zeros until grown, so both ways
train the same (``optim_state.start_bank_state`` gives a joining bank the optimizer state it would
have had). Slot numbers run over both banks; ``slot_weights`` and ``slot_parameters`` map them.

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
from .distributed import assign, full

SPARE_NAMES = ("lora_A_spare", "lora_B_spare")


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
        x = dropout(x)
        scaling = module.scaling[active_adapter]
        spare_used = module.spare_used(active_adapter)
        # both banks as one LoRA of max_r slots; not under ZeRO-3, which gathers a weight only for its own module's
        # forward and backward (there each bank runs as its module, as below)
        if spare_used and not hasattr(lora_A.weight, "ds_id"):
            weight_a = (lora_A.weight, module.lora_A_spare[active_adapter].weight)
            weight_b = (lora_B.weight, module.lora_B_spare[active_adapter].weight)
            hidden = JoinedLinear.apply(x, *weight_a, 0)
            gate = module.lora_gate[active_adapter].to(hidden.dtype)
            return result + JoinedLinear.apply(hidden * gate, *weight_b, 1) * scaling
        hidden = lora_A(x)
        gate = module.lora_gate[active_adapter].to(hidden.dtype)
        out = lora_B(hidden * gate[: hidden.shape[-1]])
        if spare_used or (active_adapter in module.lora_A_spare and _several_processes()):
            # ZeRO-3 with the spare bank in use; or an unused spare bank (all zero), which adds exact zeros and is
            # only there so that DDP, FSDP and ZeRO-3 see every parameter in every step
            spare = module.lora_A_spare[active_adapter](x) * gate[hidden.shape[-1]:]
            out = out + module.lora_B_spare[active_adapter](spare)
        return result + out * scaling


class JoinedLinear(torch.autograd.Function):
    """``F.linear(x, torch.cat([w1, w2], dim))`` that keeps ``w1`` and ``w2`` for the backward, not their joined copy.

    One matmul over both banks costs what the one-bank layout's did (two smaller ones cost more on a CPU),
    and rounds the same under autocast. The backward computes in the dtype the forward's matmul ran in
    (autocast's), as autocast's own linear does, and returns each bank's share of the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, dim):
        out = torch.nn.functional.linear(x, torch.cat([w1, w2], dim=dim))
        ctx.save_for_backward(x, w1, w2)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, w2 = ctx.saved_tensors
        dtype = grad_out.dtype
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ torch.cat([w1, w2], dim=ctx.dim).to(dtype)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dtype)
            grad_w1, grad_w2 = grad_w.split([w1.shape[ctx.dim], w2.shape[ctx.dim]], dim=ctx.dim)
            grad_w1, grad_w2 = grad_w1.to(w1.dtype), grad_w2.to(w2.dtype)
        return grad_x, grad_w1, grad_w2, None


def _several_processes() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _version_of(tensor: torch.Tensor) -> Optional[int]:
    """How often ``tensor`` was written in place (None for an inference-mode tensor, which keeps no count)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _spare_used(spare_gates: torch.Tensor, spare_a: torch.Tensor) -> bool:
    """Whether a spare bank has been grown into: a slot is on, or an A row is not zero (see GatedLoraMixin.spare_used)."""
    return bool((spare_gates != 0).any()) or bool((spare_a != 0).any())


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

    # the spare bank is listed with PEFT's A and B, so that PEFT moves, casts, freezes and deletes it with them
    adapter_layer_names = LoraLayer.adapter_layer_names + SPARE_NAMES
    # per-adapter state besides LoRA's own; listed so that PEFT's delete_adapter removes it too
    other_param_names = LoraLayer.other_param_names + ("lora_gate", "lora_scale", "r_init", "init_lora_weights",
                                                       "spare_in_use", "_spare_seen")

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
            self.lora_A_spare = torch.nn.ModuleDict()
            self.lora_B_spare = torch.nn.ModuleDict()
            self.r_init = {}
            self.init_lora_weights = {}
            self.spare_in_use = {}
            self._spare_seen = {}  # adapter -> (gate, spare A, their versions) when spare_in_use was last derived
        r_init = r
        capacity = config.capacity
        random_state = torch.random.get_rng_state()
        # PEFT builds the main bank: r_init slots, scaled as a rank-r_init LoRA
        super().update_layer(adapter_name, r_init, lora_alpha=lora_alpha, config=config, **kwargs)
        self.r_init[adapter_name] = r_init
        self.init_lora_weights[adapter_name] = config.init_lora_weights
        self._draw_as_one_bank(adapter_name, capacity, random_state)
        self._add_spare_bank(adapter_name, capacity - r_init)
        # on the base layer's device, never on "meta" (low_cpu_mem_usage builds A and B there, and PEFT then
        # moves every lora_* submodule without meta parameters: a meta buffer cannot be moved)
        device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        gate = torch.zeros(capacity, dtype=torch.float32, device=device)
        gate[:r_init] = 1.0
        self.lora_gate[adapter_name] = gate
        # saved with the weights, so that a load can tell when r / lora_alpha in adapter_config.json were changed
        self.lora_scale[adapter_name] = torch.tensor([self.scaling[adapter_name]], dtype=torch.float32, device=device)

    @torch.no_grad()
    def _draw_as_one_bank(self, adapter: str, capacity: int, random_state: torch.Tensor) -> None:
        """Redraw the main bank from ``random_state`` (taken before PEFT drew it) as the first r_init of
        ``capacity`` slots, drawn the way PEFT 0.21 draws a LoRA of that rank (``nn.Linear``'s own init of A
        and B, then ``reset_lora_parameters``). peft_alora kept all slots in one bank before, so a seed gives
        the same adapter and the same run as it did then, and the random stream goes on as it did."""
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if weight_a.device.type == "meta":
            return  # low_cpu_mem_usage: nothing was drawn, the weights come from a file
        r_init, init = self.r_init[adapter], self.init_lora_weights[adapter]
        torch.random.set_rng_state(random_state)
        draw_a, draw_b = torch.empty(capacity, self.in_features), torch.empty(self.out_features, capacity)
        torch.nn.init.kaiming_uniform_(draw_a, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(draw_b, a=math.sqrt(5))
        if init == "gaussian":  # PEFT drew std 1 / capacity, then the old layer redrew with 1 / r (a rank-r LoRA's)
            draw_a.normal_(0.0, 1.0 / capacity)
            draw_a.normal_(0.0, 1.0 / r_init)
        elif init is not False:
            torch.nn.init.kaiming_uniform_(draw_a, a=math.sqrt(5))
        weight_a.copy_(draw_a[:r_init])
        if init is False:  # PEFT's "no init": B keeps nn.Linear's draw
            weight_b.copy_(draw_b[:, :r_init])

    def _add_spare_bank(self, adapter: str, slots: int) -> None:
        """The spare slots, on the main bank's device, dtype and trainability, all zero: a slot gets its A row when
        it is grown, and a zero slot stays zero under weight decay, trained in the forward or not."""
        self.spare_in_use[adapter] = False
        if slots <= 0:
            return
        main_a, main_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        spare_a = torch.nn.Linear(self.in_features, slots, bias=False, device="meta")
        spare_b = torch.nn.Linear(slots, self.out_features, bias=False, device="meta")
        if main_a.device.type != "meta":  # low_cpu_mem_usage: PEFT builds the main bank on "meta" too
            spare_a.to_empty(device=main_a.device)
            spare_b.to_empty(device=main_b.device)
            with torch.no_grad():
                spare_a.weight.zero_()
                spare_b.weight.zero_()
        spare_a.to(main_a.dtype).requires_grad_(main_a.requires_grad)
        spare_b.to(main_b.dtype).requires_grad_(main_b.requires_grad)
        self.lora_A_spare[adapter] = spare_a
        self.lora_B_spare[adapter] = spare_b

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for adapter in self.lora_gate:
            if f"{prefix}lora_A.{adapter}.weight" in state_dict:  # this load carries weights of `adapter`
                self._split_one_bank_file(state_dict, prefix, adapter)
                self._check_loaded_adapter(state_dict, prefix, adapter)
                spare_a = state_dict.get(f"{prefix}lora_A_spare.{adapter}.weight")
                gate = state_dict[f"{prefix}lora_gate.{adapter}"][self.r_init[adapter]:]
                self.spare_in_use[adapter] = spare_a is not None and _spare_used(gate, spare_a)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _split_one_bank_file(self, state_dict, prefix, adapter: str) -> None:
        """An adapter saved before the two-bank layout holds all ``max_r`` slots in ``lora_A`` / ``lora_B``:
        its rows (A) and columns (B) past ``r_init`` become the spare bank's entries."""
        a_key, b_key = f"{prefix}lora_A.{adapter}.weight", f"{prefix}lora_B.{adapter}.weight"
        main = self.r_init[adapter]
        weight_a, weight_b = state_dict[a_key], state_dict.get(b_key)
        if adapter not in self.lora_A_spare or weight_a.shape[0] != self.capacity(adapter) or weight_b is None:
            return
        if f"{prefix}lora_A_spare.{adapter}.weight" in state_dict:
            return  # both layouts at once: the shape checks below report it
        state_dict[a_key], state_dict[f"{prefix}lora_A_spare.{adapter}.weight"] = (
            weight_a[:main].contiguous(), weight_a[main:].contiguous())
        state_dict[b_key], state_dict[f"{prefix}lora_B_spare.{adapter}.weight"] = (
            weight_b[:, :main].contiguous(), weight_b[:, main:].contiguous())

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
        weight_A, weight_B = self.slot_weights(adapter, gather=False)
        dtype = weight_B.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        gate = self.lora_gate[adapter].to(weight_A.device, compute)
        delta = (weight_B.to(compute) * gate) @ weight_A.to(compute)
        delta = transpose(delta, getattr(self, "fan_in_fan_out", False)) * self.scaling[adapter]
        return delta.to(dtype)

    # ---- rank-state API (used by the allocator) -------------------------------------------

    def capacity(self, adapter: str) -> int:
        return self.lora_gate[adapter].numel()

    def spare_used(self, adapter: str) -> bool:
        """Whether a slot of the spare bank has been grown (the bank then stays in the forward, pruned slots
        included). Before that, in one process, the forward leaves it out.

        A bank that was ever grown into has a nonzero A row (a grown slot's A row is drawn fresh and
        only decays afterwards), so the weights themselves record it, in checkpoints too. The flag is
        set by ``activate_slot`` and by loads through PEFT; weights or gates written any other way
        (transformers' ``load_adapter`` sets them directly) are looked at once per change.
        """
        if adapter not in self.lora_A_spare:
            return False
        if not self.spare_in_use[adapter]:
            gate, spare_a = self.lora_gate[adapter], self.lora_A_spare[adapter].weight
            seen = self._spare_seen.get(adapter)
            if seen is None or seen[0] is not gate or seen[1] is not spare_a \
                    or seen[2:] != (_version_of(gate), _version_of(spare_a)):
                self.spare_in_use[adapter] = _spare_used(gate[self.r_init[adapter]:], spare_a)
                self._spare_seen[adapter] = (gate, spare_a, _version_of(gate), _version_of(spare_a))
        return self.spare_in_use[adapter]

    def slot_weights(self, adapter: str, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A (max_r x in) and B (out x max_r) of every slot, both banks joined (a copy when there are two);
        ``gather``: sharded parameters are gathered first (a collective under FSDP / ZeRO-3)."""
        take = full if gather else (lambda tensor: tensor)
        weight_a, weight_b = take(self.lora_A[adapter].weight), take(self.lora_B[adapter].weight)
        if adapter in self.lora_A_spare:
            weight_a = torch.cat([weight_a, take(self.lora_A_spare[adapter].weight).to(weight_a.device)])
            weight_b = torch.cat([weight_b, take(self.lora_B_spare[adapter].weight).to(weight_b.device)], dim=1)
        return weight_a, weight_b

    def slot_parameters(self, adapter: str, slot: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter, int]:
        """The A and B parameters of the bank that holds ``slot``, and the slot's index in that bank."""
        main = self.r_init[adapter]  # not the weight's shape: a ZeRO-3 parameter is empty between forwards
        if slot < main:
            return self.lora_A[adapter].weight, self.lora_B[adapter].weight, slot
        return self.lora_A_spare[adapter].weight, self.lora_B_spare[adapter].weight, slot - main

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
        weight_A, weight_B, index = self.slot_parameters(adapter, slot)
        row = fresh_a_row(self.in_features, self.init_lora_weights.get(adapter, True), self.r_init[adapter],
                          generator=generator)[0]
        if direction is not None:
            row = direction.to(row) * row.norm()
        assign(weight_A, index, row.to(device=weight_A.device, dtype=weight_A.dtype))
        assign(weight_B, (slice(None), index), 0.0)
        gate[slot] = 1.0
        if slot >= self.r_init[adapter]:
            self.spare_in_use[adapter] = True


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
